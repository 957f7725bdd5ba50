"""The one exception hierarchy of loraforge.

Every error a user can meet is a ``LoraforgeError``; its message says what went wrong, where
(file, line, field) and what to do. Grouped by how the caller should react::

    LoraforgeError
    ├── ConfigError            the configuration is invalid: fix the YAML file or the flag
    ├── ModelError             a model cannot be found or loaded
    │   └── ModelNotFoundError     a hub id that is not on disk: nothing is downloaded at run time
    ├── GateError              the data gate could not run
    │   └── InputError             an input file is missing or unreadable as a whole
    ├── TrainError             training cannot start or had to stop
    │   ├── PreflightError         a check before training found a run-wasting problem
    │   ├── TrainingDiverged       NaN / inf loss or a loss spike: the last good weights are kept
    │   └── OutOfMemory            the run does not fit: says which setting to lower
    ├── TemplateError          a chat template that cannot be trained on (rewrites earlier turns)
    ├── EvalError              evaluation cannot run: unreadable test data, no adapter in the run
    ├── PromotionFailed        the adapter missed a promotion requirement (exit code 3, not 2)
    ├── ServeError             the server cannot load what it was asked to serve
    │   └── AdapterError           an adapter outside the adapter root, not safetensors, unknown
    ├── ClientError            the resilient client could not get an answer
    │   ├── RequestRejected        the request itself is wrong (a 4xx): never retried, no fallback
    │   ├── AllRoutesFailed        every route failed; lists each route and why
    │   ├── DeadlineExceeded       the call's overall deadline passed
    │   └── StreamInterrupted      a stream failed after its first token (no fallback mid-answer)
    └── EnvironmentProblem     the environment (versions, GPU, disk) blocks the job

Foreign exceptions are translated into these at the boundary that knows the context, with
``raise ... from exc`` so the original traceback stays available.
"""

from __future__ import annotations


class LoraforgeError(Exception):
    """Base class: every error loraforge raises on purpose."""

    exit_code = 2


class ConfigError(LoraforgeError):
    """The configuration is invalid (unknown key, wrong type, value out of range)."""


class ModelError(LoraforgeError):
    """A model or tokenizer cannot be loaded."""


class ModelNotFoundError(ModelError):
    """A model name that is neither a known embedded model nor a local directory."""


class GateError(LoraforgeError):
    """The data gate cannot run."""


class InputError(GateError):
    """An input file is missing or cannot be read as a whole (unknown extension, broken JSON array)."""


class EnvironmentProblem(LoraforgeError):
    """A blocking problem in the environment: versions, GPU, disk."""


class TrainError(LoraforgeError):
    """Training cannot start, or had to stop."""


class PreflightError(TrainError):
    """A preflight check found a problem that would waste the run."""


class TrainingDiverged(TrainError):
    """The loss became NaN / inf or spiked; training stopped with the last good weights saved."""


class OutOfMemory(TrainError):
    """The run does not fit in memory; the message names the setting to lower."""


class TemplateError(LoraforgeError):
    """A chat template loraforge cannot train on."""


class EvalError(LoraforgeError):
    """Evaluation cannot run: a test-data line that is not a usable sample, a run without an adapter."""


class PromotionFailed(LoraforgeError):
    """The evaluation ran, but the adapter missed a promotion requirement; the message has the numbers.

    Its own exit code, so a CI job can tell "this adapter is not good enough" (3) from "the
    evaluation could not run" (2).
    """

    exit_code = 3


class ServeError(LoraforgeError):
    """The server cannot start or cannot load what it was asked to."""


class AdapterError(ServeError):
    """An adapter that cannot be loaded: outside the adapter root, not safetensors, malformed."""


class ClientError(LoraforgeError):
    """The resilient client could not get an answer."""


class RequestRejected(ClientError):
    """A server refused the request itself (validation, context too long): fix the request."""

    def __init__(self, message: str, status: int, route: str, body: object = None):
        super().__init__(message)
        self.status, self.route, self.body = status, route, body


class AllRoutesFailed(ClientError):
    """Every route failed; ``failures`` maps route name to why."""

    def __init__(self, failures: dict[str, str]):
        super().__init__("every route failed: " + "; ".join(f"{name}: {why}" for name, why in failures.items()))
        self.failures = failures


class DeadlineExceeded(ClientError):
    """The call's overall deadline passed before any route answered."""

    def __init__(self, message: str, failures: dict[str, str] | None = None):
        super().__init__(message)
        self.failures = failures or {}


class StreamInterrupted(ClientError):
    """A stream failed after its first token: the partial answer cannot be continued elsewhere."""

    def __init__(self, message: str, route: str, partial: str):
        super().__init__(message)
        self.route, self.partial = route, partial

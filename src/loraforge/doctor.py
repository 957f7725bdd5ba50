"""``loraforge doctor``: the environment a LoRA fine-tune depends on, and what is wrong with it.

Design, in two halves that never mix:

* **Facts.** ``collect()`` gathers plain values into a ``DoctorReport``: Python, torch and its
  CUDA build, the GPUs (name, compute capability, bf16), bitsandbytes, the versions of the
  libraries the training stack uses, free disk and memory. Versions come from
  ``importlib.metadata`` (nothing heavy is imported for a version); only torch is imported,
  because the CUDA facts exist nowhere else. bitsandbytes is imported only when CUDA is
  available, and every import that can break is wrapped, so a broken environment is reported,
  not crashed on.
* **Rules.** Each known-bad combination is one small ``check_*`` function that takes plain
  values (never the live environment) and returns ``Finding``\\ s with a level (``ok``, ``warn``,
  ``block``), what is wrong, and the concrete fix. Tests call them with fabricated inputs;
  ``findings_for(report)`` feeds them the collected facts.

``render`` prints two rich tables, ``to_json`` serialises the report, and ``run`` does all of
it and returns the exit status: 1 when any finding blocks, else 0. Code that must refuse to
start on a blocked environment calls ``raise_if_blocked(report)`` (an ``EnvironmentProblem``).
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import shutil
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, Field
from rich.console import Console
from rich.table import Table

from loraforge.errors import EnvironmentProblem

GIB = 1024**3
DISK_BLOCK_BYTES = 2 * GIB
DISK_WARN_BYTES = 10 * GIB
MEMORY_WARN_BYTES = 2 * GIB
MIN_PYTHON = (3, 11)
BF16_MIN_CAPABILITY = (8, 0)
OPTIONAL_EXTRA = "train"  # missing -> warn; every other extra (test, ...) missing -> not checked
STACK_PACKAGES = ("transformers", "peft", "trl", "accelerate", "tokenizers", "safetensors", "gguf")
NO_CUDA_QLORA = "no CUDA: QLoRA unavailable"

Level = Literal["ok", "warn", "block"]


class Finding(BaseModel):
    level: Level
    what: str
    fix: str = ""


class GpuInfo(BaseModel):
    index: int
    name: str
    compute_capability: tuple[int, int] | None = None
    bf16: bool | None = None
    memory_total_bytes: int | None = None


class DoctorReport(BaseModel):
    python: str
    python_version: tuple[int, int, int]
    platform: str
    torch: str | None = None
    torch_error: str | None = None
    torch_cuda: str | None = None
    cuda_available: bool = False
    gpus: list[GpuInfo] = Field(default_factory=list)
    bitsandbytes: str | None = None
    bitsandbytes_cuda: str = NO_CUDA_QLORA
    bitsandbytes_loads: bool | None = None
    packages: dict[str, str | None] = Field(default_factory=dict)
    cache_dir: str
    cache_dir_free_bytes: int | None = None
    cwd: str
    cwd_free_bytes: int | None = None
    memory_total_bytes: int | None = None
    memory_available_bytes: int | None = None
    findings: list[Finding] = Field(default_factory=list)

    @property
    def blocked(self) -> bool:
        return any(finding.level == "block" for finding in self.findings)


# ---- facts ---------------------------------------------------------------------------------


def installed_version(name: str) -> str | None:
    """The installed distribution version of ``name``, or None; never imports the package."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def declared_requirements() -> list[str]:
    """loraforge's own requirement strings, markers included (empty if not installed as a dist)."""
    try:
        return list(importlib.metadata.requires("loraforge") or [])
    except importlib.metadata.PackageNotFoundError:
        return []


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest parent that exists (the cache dir may not be created yet)."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(nearest_existing(path)).free
    except OSError:
        return None


def _cache_dir() -> Path:
    from loraforge.models.registry import cache_root

    return cache_root()


def _memory() -> tuple[int | None, int | None]:
    try:
        import psutil

        memory = psutil.virtual_memory()
        return memory.total, memory.available
    except Exception:  # psutil missing or unreadable /proc: memory facts stay unknown
        return None, None


def _gpu_info(torch, index: int) -> GpuInfo:
    properties = torch.cuda.get_device_properties(index)
    capability = tuple(torch.cuda.get_device_capability(index))
    try:
        with torch.cuda.device(index):
            # including_emulation=False: with emulation torch says True on pre-Ampere GPUs too.
            bf16 = bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch without the keyword
        bf16 = capability >= BF16_MIN_CAPABILITY
    return GpuInfo(
        index=index,
        name=properties.name,
        compute_capability=capability,
        bf16=bf16,
        memory_total_bytes=properties.total_memory,
    )


def _torch_facts() -> dict:
    """torch version, CUDA build, availability and GPUs; an import failure becomes ``torch_error``."""
    if installed_version("torch") is None:
        return {}
    try:
        import torch
    except Exception as exc:  # broken CUDA libraries raise OSError, ImportError, RuntimeError...
        return {"torch_error": f"{type(exc).__name__}: {exc}"}
    facts = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    try:
        facts["cuda_available"] = bool(torch.cuda.is_available())
        if facts["cuda_available"]:
            facts["gpus"] = [_gpu_info(torch, i) for i in range(torch.cuda.device_count())]
    except Exception as exc:
        facts["cuda_available"] = False
        facts["torch_error"] = f"CUDA query failed: {type(exc).__name__}: {exc}"
    return facts


def _bitsandbytes_cuda(cuda_available: bool) -> tuple[str, bool | None]:
    """Whether bitsandbytes' CUDA binary loads: (status text, loads). Imports it only on CUDA."""
    if installed_version("bitsandbytes") is None:
        return ("not installed" if cuda_available else NO_CUDA_QLORA), None
    if not cuda_available:
        return NO_CUDA_QLORA, None
    try:
        import torch
        import bitsandbytes.functional as bnb_functional

        sample = torch.ones(64, device="cuda", dtype=torch.float16)
        bnb_functional.quantize_4bit(sample, quant_type="nf4")
    except Exception as exc:  # bitsandbytes raises anything from OSError to RuntimeError
        return f"CUDA binary does not load: {type(exc).__name__}: {exc}", False
    return "CUDA binary loads (4-bit quantize ok)", True


def collect() -> DoctorReport:
    """Gather the facts of this machine and evaluate every rule on them."""
    cache_dir, cwd = _cache_dir(), Path.cwd()
    memory_total, memory_available = _memory()
    torch_facts = _torch_facts()
    bnb_status, bnb_loads = _bitsandbytes_cuda(torch_facts.get("cuda_available", False))
    report = DoctorReport(
        python=sys.version.split()[0],
        python_version=tuple(sys.version_info[:3]),
        platform=platform.platform(),
        **torch_facts,
        bitsandbytes=installed_version("bitsandbytes"),
        bitsandbytes_cuda=bnb_status,
        bitsandbytes_loads=bnb_loads,
        packages={name: installed_version(name) for name in STACK_PACKAGES},
        cache_dir=str(cache_dir),
        cache_dir_free_bytes=free_bytes(cache_dir),
        cwd=str(cwd),
        cwd_free_bytes=free_bytes(cwd),
        memory_total_bytes=memory_total,
        memory_available_bytes=memory_available,
    )
    report.findings = findings_for(report)
    return report


# ---- rules ---------------------------------------------------------------------------------


def _extra_of(requirement: Requirement) -> str | None:
    match = re.search(r"""extra\s*==\s*['"]([^'"]+)['"]""", str(requirement.marker or ""))
    return match.group(1) if match else None


def _applies_here(requirement: Requirement, extra: str | None) -> bool:
    """False for a requirement whose non-extra markers (python_version, sys_platform) exclude us."""
    if requirement.marker is None:
        return True
    return requirement.marker.evaluate({"extra": extra or ""})


def check_requirement(text: str, installed: str | None) -> Finding | None:
    """One declared requirement against the installed version; None when there is nothing to say."""
    try:
        requirement = Requirement(text)
    except InvalidRequirement:
        return Finding(level="warn", what=f"cannot parse loraforge's requirement {text!r}", fix="reinstall loraforge: pip install -e .")
    extra = _extra_of(requirement)
    if not _applies_here(requirement, extra):
        return None
    pinned = text.split(";")[0].strip()
    fix = f"pip install '{pinned}'"
    if installed is None:
        if extra is None:
            return Finding(level="block", what=f"{requirement.name} is not installed (loraforge needs {pinned})", fix=fix)
        if extra == OPTIONAL_EXTRA:
            return Finding(level="warn", what=f"{requirement.name} is not installed: `loraforge train` needs it ({pinned})", fix=f"{fix}  (or pip install 'loraforge[{extra}]')")
        return None
    try:
        inside = requirement.specifier.contains(Version(installed), prereleases=True)
    except InvalidVersion:
        return Finding(level="warn", what=f"{requirement.name} has an unparsable version {installed!r}", fix=fix)
    if inside:
        return None
    return Finding(level="block", what=f"{requirement.name} {installed} is outside the range loraforge declares ({pinned})", fix=fix)


def check_declared_versions(requirements: Iterable[str], installed: Mapping[str, str | None]) -> list[Finding]:
    """Rule 1: each declared dependency installed and inside its declared range.

    ``installed`` maps a distribution name (any spelling) to its version; absent or None means
    not installed. Required and ``train`` dependencies block when out of range; a missing
    ``train`` dependency (trl) only warns; other extras (``test``) are checked only if installed.
    """
    versions = {canonicalize_name(name): version for name, version in installed.items()}
    requirements = list(requirements)
    findings = []
    for text in requirements:
        try:
            name = canonicalize_name(Requirement(text).name)
        except InvalidRequirement:
            name = ""
        finding = check_requirement(text, versions.get(name))
        if finding is not None:
            findings.append(finding)
    if not findings:
        findings.append(Finding(level="ok", what=f"all {len(requirements)} declared dependencies are inside their ranges"))
    return findings


def check_python(version: tuple[int, ...]) -> list[Finding]:
    """Rule 2: loraforge needs Python >= 3.11."""
    shown = ".".join(map(str, version))
    if tuple(version[:2]) < MIN_PYTHON:
        needed = ".".join(map(str, MIN_PYTHON))
        return [Finding(level="block", what=f"Python {shown} is older than {needed}", fix=f"create the venv with python{needed} or newer: python{needed} -m venv .venv")]
    return [Finding(level="ok", what=f"Python {shown}")]


def check_torch_imports(torch_installed: str | None, torch_error: str | None) -> list[Finding]:
    """torch installed but failing to import (broken CUDA libraries) blocks everything."""
    if torch_error is None:
        return []
    version = torch_installed or "<version>"
    return [Finding(level="block", what=f"torch does not work: {torch_error}", fix=f"pip install --force-reinstall 'torch=={version}' (the build matching your driver), then check nvidia-smi")]


def check_cuda_visible(torch_cuda: str | None, cuda_available: bool) -> list[Finding]:
    """Rule 3: a CUDA build of torch that sees no GPU trains on CPU, silently and slowly."""
    if torch_cuda is None:
        return [Finding(level="ok", what="torch is a CPU build: training runs on CPU (tiny models only)")]
    if not cuda_available:
        return [Finding(
            level="warn",
            what=f"torch is a CUDA {torch_cuda} build but no GPU is visible",
            fix="check nvidia-smi, the driver and CUDA_VISIBLE_DEVICES; on a machine without GPU install the CPU build: "
            "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu",
        )]
    return [Finding(level="ok", what=f"torch CUDA {torch_cuda} build sees the GPU")]


def check_bf16(gpus: Iterable[GpuInfo]) -> list[Finding]:
    """Rule 4: a GPU below compute capability 8.0 (pre-Ampere) has no bf16."""
    findings = []
    for gpu in gpus:
        capability = gpu.compute_capability
        shown = ".".join(map(str, capability)) if capability else "?"
        if gpu.bf16 is False or (capability is not None and capability < BF16_MIN_CAPABILITY):
            findings.append(Finding(
                level="warn",
                what=f"GPU {gpu.index} {gpu.name} (compute capability {shown}) has no bf16: training falls back to fp16/fp32",
                fix="set train.bf16: false in the config, or use an Ampere or newer GPU (A100, H100, RTX 30xx+)",
            ))
        else:
            findings.append(Finding(level="ok", what=f"GPU {gpu.index} {gpu.name} (compute capability {shown}) supports bf16"))
    return findings


def check_bitsandbytes(bnb_version: str | None, cuda_available: bool, loads: bool | None, torch_cuda: str | None = None, status: str = "") -> list[Finding]:
    """Rule 5: QLoRA needs bitsandbytes whose CUDA binary loads on this machine."""
    if not cuda_available:
        return [Finding(level="ok", what=f"{NO_CUDA_QLORA} (QLoRA needs a CUDA GPU); plain LoRA works")]
    if bnb_version is None:
        return [Finding(level="warn", what="bitsandbytes is not installed: QLoRA unavailable (LoRA works)", fix="pip install bitsandbytes")]
    if loads is False:
        build = f"CUDA {torch_cuda}" if torch_cuda else "torch's CUDA"
        return [Finding(
            level="block",
            what=f"bitsandbytes {bnb_version} is installed but its CUDA binary does not load: QLoRA fails ({status})",
            fix=f"pip install --upgrade 'bitsandbytes>=0.45' (a build for {build}; check BNB_CUDA_VERSION is unset)",
        )]
    return [Finding(level="ok", what=f"bitsandbytes {bnb_version} loads on CUDA: QLoRA available")]


def check_disk(free: int | None, path: str = "cache dir") -> list[Finding]:
    """Rule 6: the cache dir holds converted models and checkpoints: < 2 GiB blocks, < 10 GiB warns."""
    if free is None:
        return [Finding(level="warn", what=f"cannot read free disk space of {path}", fix="check the path exists and is readable, or set LORAFORGE_HOME")]
    fix = "free disk space, or set LORAFORGE_HOME to a directory on a larger disk"
    shown = f"{free / GIB:.1f} GiB free in {path}"
    if free < DISK_BLOCK_BYTES:
        return [Finding(level="block", what=f"only {shown} (needs >= {DISK_BLOCK_BYTES // GIB} GiB)", fix=fix)]
    if free < DISK_WARN_BYTES:
        return [Finding(level="warn", what=f"only {shown} (recommended >= {DISK_WARN_BYTES // GIB} GiB)", fix=fix)]
    return [Finding(level="ok", what=shown)]


def check_memory(available: int | None) -> list[Finding]:
    """Rule 7: less than 2 GiB available RAM makes loading even a small model swap or die."""
    if available is None:
        return [Finding(level="warn", what="available memory unknown (psutil missing?)", fix="pip install 'psutil>=5.9'")]
    shown = f"{available / GIB:.1f} GiB memory available"
    if available < MEMORY_WARN_BYTES:
        return [Finding(level="warn", what=f"only {shown}", fix="close other processes or use a machine with more RAM; lower gate/train batch sizes")]
    return [Finding(level="ok", what=shown)]


def _parse_version(version: str | None) -> Version | None:
    try:
        return Version(version) if version else None
    except InvalidVersion:
        return None


def check_transformers_stack(packages: Mapping[str, str | None]) -> list[Finding]:
    """Rule 8: transformers 5 needs peft >= 0.18; transformers' Trainer needs accelerate."""
    findings = []
    transformers, peft = _parse_version(packages.get("transformers")), _parse_version(packages.get("peft"))
    if transformers and peft and transformers.major >= 5 and peft < Version("0.18"):
        findings.append(Finding(
            level="block",
            what=f"peft {peft} is too old for transformers {transformers} (transformers 5 needs peft >= 0.18)",
            fix="pip install 'peft>=0.21,<0.22'",
        ))
    if packages.get("accelerate") is None:
        findings.append(Finding(level="block", what="accelerate is not installed: transformers' Trainer and device_map need it", fix="pip install 'accelerate>=1.10,<2'"))
    return findings


def findings_for(report: DoctorReport) -> list[Finding]:
    """Every rule, fed with the report's facts."""
    requirements = declared_requirements()
    names = [Requirement(text).name for text in requirements if _parses(text)]
    installed = {name: installed_version(name) for name in names}
    return [
        *check_python(report.python_version),
        *check_declared_versions(requirements, installed),
        *check_transformers_stack(report.packages),
        *check_torch_imports(report.torch, report.torch_error),
        *check_cuda_visible(report.torch_cuda, report.cuda_available),
        *check_bf16(report.gpus),
        *check_bitsandbytes(report.bitsandbytes, report.cuda_available, report.bitsandbytes_loads, report.torch_cuda, report.bitsandbytes_cuda),
        *check_disk(report.cache_dir_free_bytes, f"cache dir {report.cache_dir}"),
        *check_memory(report.memory_available_bytes),
    ]


def _parses(text: str) -> bool:
    try:
        Requirement(text)
    except InvalidRequirement:
        return False
    return True


# ---- output --------------------------------------------------------------------------------

_STYLE = {"ok": "green", "warn": "yellow", "block": "bold red"}


def _gib(value: int | None) -> str:
    return "?" if value is None else f"{value / GIB:.1f} GiB"


def _facts(report: DoctorReport) -> list[tuple[str, str]]:
    rows = [
        ("python", f"{report.python} ({report.platform})"),
        ("torch", report.torch or (f"broken: {report.torch_error}" if report.torch_error else "not installed")),
        ("torch CUDA build", report.torch_cuda or "none (CPU build)"),
        ("CUDA available", str(report.cuda_available)),
    ]
    for gpu in report.gpus:
        capability = ".".join(map(str, gpu.compute_capability)) if gpu.compute_capability else "?"
        rows.append((f"GPU {gpu.index}", f"{gpu.name}, cc {capability}, bf16 {gpu.bf16}, {_gib(gpu.memory_total_bytes)}"))
    rows.append(("bitsandbytes", f"{report.bitsandbytes or 'not installed'}: {report.bitsandbytes_cuda}"))
    rows += [(name, version or "not installed") for name, version in report.packages.items()]
    rows += [
        ("cache dir", f"{report.cache_dir} ({_gib(report.cache_dir_free_bytes)} free)"),
        ("current dir", f"{report.cwd} ({_gib(report.cwd_free_bytes)} free)"),
        ("memory", f"{_gib(report.memory_available_bytes)} available of {_gib(report.memory_total_bytes)}"),
    ]
    return rows


def render(report: DoctorReport, console: Console) -> None:
    """Two tables: the facts, then the findings coloured by level."""
    facts = Table(title="loraforge doctor: environment", show_header=False)
    facts.add_column("fact", style="bold")
    facts.add_column("value", overflow="fold")
    for name, value in _facts(report):
        facts.add_row(name, value)
    console.print(facts)
    findings = Table(title="findings")
    findings.add_column("level")
    findings.add_column("what", overflow="fold")
    findings.add_column("fix", overflow="fold")
    for finding in report.findings:
        style = _STYLE[finding.level]
        findings.add_row(f"[{style}]{finding.level}[/]", finding.what, finding.fix)
    console.print(findings)
    verdict = "[bold red]blocked: fix the red rows first[/]" if report.blocked else "[green]no blocking problem[/]"
    console.print(verdict)


def to_json(report: DoctorReport) -> str:
    return report.model_dump_json(indent=2)


def raise_if_blocked(report: DoctorReport) -> None:
    """For stages that must not start on a blocked environment."""
    blocks = [f"{f.what} -> {f.fix}" for f in report.findings if f.level == "block"]
    if blocks:
        raise EnvironmentProblem("the environment blocks the job (run `loraforge doctor`):\n  " + "\n  ".join(blocks))


def run(as_json: bool = False) -> int:
    """Collect, print (rich tables or JSON on stdout) and return 1 if anything blocks, else 0."""
    report = collect()
    if as_json:
        sys.stdout.write(to_json(report) + "\n")
    else:
        render(report, Console())
    return 1 if report.blocked else 0

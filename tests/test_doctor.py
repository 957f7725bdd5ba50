"""loraforge doctor: the real collect() on this CPU machine, and every rule with fabricated inputs."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from loraforge import doctor
from loraforge.doctor import GIB, DoctorReport, Finding, GpuInfo


def levels(findings: list[Finding]) -> list[str]:
    return [finding.level for finding in findings]


@pytest.fixture(scope="module")
def report() -> DoctorReport:
    return doctor.collect()


# ---- the real machine ------------------------------------------------------------------------


def test_collect_reports_this_cpu_machine(report):
    assert report.torch and report.torch[0].isdigit()
    assert report.torch_error is None
    assert report.torch_cuda is None or report.cuda_available is False
    assert report.gpus == [] or report.cuda_available
    assert report.memory_total_bytes > 0 and report.memory_available_bytes > 0
    assert report.cache_dir_free_bytes > 0 and report.cwd_free_bytes > 0
    assert report.python_version[:2] >= (3, 11)
    assert set(report.packages) == set(doctor.STACK_PACKAGES)
    assert report.packages["transformers"] is not None


def test_collect_on_cpu_says_qlora_unavailable(report):
    if report.cuda_available:
        pytest.skip("this machine has CUDA")
    assert report.bitsandbytes_cuda == doctor.NO_CUDA_QLORA
    assert report.bitsandbytes_loads is None


def test_collect_finds_nothing_blocking_here(report):
    blocks = [f for f in report.findings if f.level == "block"]
    assert blocks == []


def test_run_as_json_prints_valid_json_and_returns_0(capsys):
    assert doctor.run(as_json=True) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["torch"] and isinstance(data["findings"], list)
    assert {"level", "what", "fix"} <= set(data["findings"][0])


def test_render_prints_both_tables(report):
    console = Console(file=io.StringIO(), width=200, color_system=None)
    doctor.render(report, console)
    text = console.file.getvalue()
    assert "torch" in text and "findings" in text and "no blocking problem" in text


def test_to_json_round_trips(report):
    assert DoctorReport.model_validate_json(doctor.to_json(report)) == report


def test_cache_dir_free_space_uses_nearest_existing_parent(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFORGE_HOME", str(tmp_path / "not" / "yet" / "there"))
    assert doctor.nearest_existing(doctor._cache_dir()) == tmp_path
    assert doctor.free_bytes(doctor._cache_dir()) > 0


# ---- rule 1: declared versions -----------------------------------------------------------


def test_version_in_range_is_ok():
    findings = doctor.check_declared_versions(["transformers>=5.17,<6"], {"transformers": "5.24.0"})
    assert levels(findings) == ["ok"]


def test_version_out_of_range_blocks_with_the_requirement_as_fix():
    [finding] = doctor.check_declared_versions(["transformers>=5.17,<6"], {"transformers": "4.40.0"})
    assert finding.level == "block"
    assert "transformers>=5.17,<6" in finding.fix and finding.fix.startswith("pip install")


def test_missing_required_dependency_blocks():
    [finding] = doctor.check_declared_versions(["accelerate>=1.10,<2"], {})
    assert finding.level == "block" and "accelerate>=1.10,<2" in finding.fix


def test_local_version_label_is_inside_the_range():
    assert levels(doctor.check_declared_versions(["torch>=2.9,<2.15"], {"torch": "2.13.0+cpu"})) == ["ok"]


def test_optional_train_extra_missing_only_warns():
    [finding] = doctor.check_declared_versions(['trl<2,>=1.10; extra == "train"'], {"trl": None})
    assert finding.level == "warn" and "trl<2,>=1.10" in finding.fix


def test_optional_train_extra_out_of_range_blocks():
    [finding] = doctor.check_declared_versions(['trl<2,>=1.10; extra == "train"'], {"trl": "0.9.6"})
    assert finding.level == "block"


def test_other_extra_missing_is_not_checked_but_its_version_is():
    assert levels(doctor.check_declared_versions(['pytest>=8; extra == "test"'], {})) == ["ok"]
    assert levels(doctor.check_declared_versions(['pytest>=8; extra == "test"'], {"pytest": "7.4.0"})) == ["block"]


def test_names_match_in_any_spelling():
    assert levels(doctor.check_declared_versions(["pyyaml>=6"], {"PyYAML": "6.0.2"})) == ["ok"]


def test_requirement_for_another_python_is_skipped():
    assert levels(doctor.check_declared_versions(['tomli>=2; python_version < "3.0"'], {})) == ["ok"]


def test_declared_requirements_are_loraforges_own():
    names = [text.split(";")[0] for text in doctor.declared_requirements()]
    assert any(name.startswith("transformers") for name in names)


# ---- rules 2-8 ---------------------------------------------------------------------------------


def test_python_310_blocks_and_311_is_ok():
    assert levels(doctor.check_python((3, 10, 14))) == ["block"]
    assert levels(doctor.check_python((3, 11, 7))) == ["ok"]
    assert levels(doctor.check_python((3, 13, 0))) == ["ok"]


def test_torch_that_does_not_import_blocks():
    assert doctor.check_torch_imports("2.13.0", None) == []
    [finding] = doctor.check_torch_imports("2.13.0", "OSError: libcudart.so.12 missing")
    assert finding.level == "block" and "torch==2.13.0" in finding.fix


def test_cuda_build_without_visible_gpu_warns():
    [finding] = doctor.check_cuda_visible("12.8", cuda_available=False)
    assert finding.level == "warn" and "CUDA_VISIBLE_DEVICES" in finding.fix and "torch==" in finding.fix
    assert levels(doctor.check_cuda_visible("12.8", cuda_available=True)) == ["ok"]
    assert levels(doctor.check_cuda_visible(None, cuda_available=False)) == ["ok"]


def test_gpu_without_bf16_warns():
    turing = GpuInfo(index=0, name="Tesla T4", compute_capability=(7, 5), bf16=False)
    hopper = GpuInfo(index=1, name="NVIDIA H200", compute_capability=(9, 0), bf16=True)
    [t4, h200] = doctor.check_bf16([turing, hopper])
    assert t4.level == "warn" and "train.bf16: false" in t4.fix
    assert h200.level == "ok"
    assert doctor.check_bf16([]) == []


def test_capability_below_8_warns_even_if_torch_claims_bf16():
    volta = GpuInfo(index=0, name="Tesla V100", compute_capability=(7, 0), bf16=True)
    assert levels(doctor.check_bf16([volta])) == ["warn"]


def test_bitsandbytes_rules():
    assert levels(doctor.check_bitsandbytes(None, cuda_available=False, loads=None)) == ["ok"]
    assert levels(doctor.check_bitsandbytes("0.45.0", cuda_available=False, loads=None)) == ["ok"]
    [missing] = doctor.check_bitsandbytes(None, cuda_available=True, loads=None)
    assert missing.level == "warn" and "pip install bitsandbytes" in missing.fix
    [broken] = doctor.check_bitsandbytes("0.43.0", cuda_available=True, loads=False, torch_cuda="12.8")
    assert broken.level == "block" and "bitsandbytes>=0.45" in broken.fix and "12.8" in broken.fix
    assert levels(doctor.check_bitsandbytes("0.46.0", cuda_available=True, loads=True)) == ["ok"]


@pytest.mark.parametrize(
    ("free", "level"),
    [(1 * GIB, "block"), (2 * GIB - 1, "block"), (2 * GIB, "warn"), (9 * GIB, "warn"), (10 * GIB, "ok"), (None, "warn")],
)
def test_disk_thresholds(free, level):
    [finding] = doctor.check_disk(free, "cache dir /x")
    assert finding.level == level
    if level != "ok":
        assert "LORAFORGE_HOME" in finding.fix


def test_low_memory_warns():
    assert levels(doctor.check_memory(1 * GIB)) == ["warn"]
    assert levels(doctor.check_memory(16 * GIB)) == ["ok"]
    assert levels(doctor.check_memory(None)) == ["warn"]


def test_transformers_5_with_old_peft_blocks():
    [finding] = doctor.check_transformers_stack({"transformers": "5.17.0", "peft": "0.17.1", "accelerate": "1.10.0"})
    assert finding.level == "block" and "peft" in finding.fix
    assert doctor.check_transformers_stack({"transformers": "5.17.0", "peft": "0.21.2", "accelerate": "1.10.0"}) == []
    assert doctor.check_transformers_stack({"transformers": "4.57.0", "peft": "0.17.1", "accelerate": "1.10.0"}) == []


def test_missing_accelerate_blocks():
    [finding] = doctor.check_transformers_stack({"transformers": "5.17.0", "peft": "0.21.2", "accelerate": None})
    assert finding.level == "block" and "accelerate" in finding.fix


# ---- exit status ---------------------------------------------------------------------------------


def test_run_returns_1_when_a_finding_blocks(monkeypatch, report, capsys):
    blocked = report.model_copy(update={"findings": [Finding(level="block", what="x", fix="y")]})
    monkeypatch.setattr(doctor, "collect", lambda: blocked)
    assert doctor.run(as_json=True) == 1
    assert json.loads(capsys.readouterr().out)["findings"][0]["level"] == "block"


def test_raise_if_blocked(report):
    doctor.raise_if_blocked(report)
    blocked = report.model_copy(update={"findings": [Finding(level="block", what="disk full", fix="free it")]})
    with pytest.raises(doctor.EnvironmentProblem, match="disk full -> free it"):
        doctor.raise_if_blocked(blocked)

"""The switch from bf16 to fp32 on a CPU without native bf16 (distillens/precision.py)."""

from __future__ import annotations

import logging

import pytest

from distillens import precision

AVX2_ONLY = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n"
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16\n"


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """Point the flag reader at a cpuinfo text of our choosing; the tests' bf16 override off."""
    monkeypatch.delenv(precision.KEEP_BF16, raising=False)

    def use(text: str | None) -> None:
        path = tmp_path / "cpuinfo"
        if text is not None:
            path.write_text(text)
        monkeypatch.setattr(precision, "CPUINFO", path)
        precision.cpu_flags.cache_clear()

    yield use
    precision.cpu_flags.cache_clear()


@pytest.mark.parametrize("configured", ["bf16-mixed", "bf16-true"])
def test_bf16_on_an_avx2_cpu_becomes_fp32_with_one_warning(cpu, caplog, configured):
    cpu(AVX2_ONLY)
    trainer = {"accelerator": "cpu", "precision": configured}
    with caplog.at_level(logging.WARNING, logger=precision.__name__):
        precision.fall_back_from_slow_bf16(trainer)
    assert trainer["precision"] == "32-true"
    (record,) = caplog.records
    assert f"trainer.precision={configured}" in record.getMessage() and "avx512_bf16" in record.getMessage()


@pytest.mark.parametrize(
    ("text", "trainer"),
    [
        (AVX512_BF16, {"accelerator": "cpu", "precision": "bf16-mixed"}),  # native bf16: kept
        (None, {"accelerator": "cpu", "precision": "bf16-mixed"}),  # flags unknown: the config stands
        (AVX2_ONLY, {"accelerator": "cpu", "precision": "32-true"}),  # not bf16
        (AVX2_ONLY, {"accelerator": "gpu", "precision": "bf16-mixed"}),  # not on the CPU
    ],
)
def test_other_settings_are_left_alone(cpu, text, trainer):
    cpu(text)
    before = dict(trainer)
    precision.fall_back_from_slow_bf16(trainer)
    assert trainer == before


def test_the_override_keeps_bf16(cpu, monkeypatch):
    cpu(AVX2_ONLY)
    monkeypatch.setenv(precision.KEEP_BF16, "1")
    trainer = {"accelerator": "cpu", "precision": "bf16-mixed"}
    precision.fall_back_from_slow_bf16(trainer)
    assert trainer["precision"] == "bf16-mixed"


def test_the_cli_builds_the_trainer_in_fp32_on_an_avx2_cpu(cpu, tmp_path, monkeypatch):
    """LightningCLI without a subcommand builds the trainer (and models) only: its precision is the switched one."""
    import sys
    from unittest import mock

    from distillens.data import InstructionDataModule
    from distillens.lightning_cli import DistillensCLI, DistillensParser
    from distillens.module import DistillationModule

    cpu(AVX2_ONLY)
    args = ["--config", "configs/tiny.yaml", "--trainer.precision", "bf16-mixed", "--trainer.logger", "false"]
    args += ["--trainer.default_root_dir", str(tmp_path), "--data.cache_dir", str(tmp_path / "cache")]
    with mock.patch.object(sys, "argv", ["distillens"]):
        cli = DistillensCLI(
            DistillationModule, InstructionDataModule, args=args, run=False, parser_class=DistillensParser,
            auto_configure_optimizers=False,
        )  # fmt: skip
    assert cli.trainer.precision == "32-true"

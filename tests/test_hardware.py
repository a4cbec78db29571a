"""Never slower without saying so: the speed verdict, its console rows, and --require-speedup."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from oamipc.cli import app
from oamipc.hardware import cpu_channel_block, speed_verdict, unaligned_widths
from oamipc.summary import costs_table

ROOT = Path(__file__).resolve().parent.parent
MLP = str(ROOT / "examples" / "digits_mlp.pt")


def _latency(*pairs: tuple[int, float, float]) -> dict:
    """A benchmark's to_dict() with rows (batch, A median ms, B median ms)."""
    return {"provider": "CPUExecutionProvider",
            "rows": [{"batch": b, "a_median_ms": a, "b_median_ms": bb, "speedup": a / bb} for b, a, bb in pairs]}


WIDTHS = {"conv1": {"before": 32, "after": 16}, "conv2": {"before": 64, "after": 37},
          "conv3": {"before": 30, "after": 15}, "fc": {"before": 10, "after": 10}}


@pytest.mark.parametrize(("flags", "block"), [
    (frozenset({"sse2", "avx2", "avx512f"}), 16), (frozenset({"sse2", "avx2"}), 8), (frozenset({"neon"}), 4)])
def test_channel_block_follows_the_vector_width(flags: frozenset[str], block: int) -> None:
    assert cpu_channel_block(flags) == block


def test_unaligned_widths_are_only_layers_that_lost_their_alignment() -> None:
    # conv2 went from a multiple of 16 to 37; conv3 was never a multiple of 16; fc was not pruned.
    assert unaligned_widths(WIDTHS, 16) == {"conv2": (64, 37)}
    assert unaligned_widths(WIDTHS, 8) == {"conv2": (64, 37)}


def test_a_faster_network_gets_no_complaint() -> None:
    verdict = speed_verdict(_latency((1, 1.0, 0.9), (64, 10.0, 5.0)), WIDTHS, block=16)
    assert verdict["slower_batches"] == [] and verdict["why"] == ""
    assert verdict["min_speedup"] == pytest.approx(1.0 / 0.9)


def test_a_slower_network_is_named_with_its_unaligned_layers() -> None:
    verdict = speed_verdict(_latency((1, 1.0, 0.8), (64, 10.0, 12.5)), WIDTHS, block=16)
    assert verdict["slower_batches"] == [64]
    assert verdict["min_speedup"] == pytest.approx(0.8)
    assert "conv2 64->37" in verdict["why"] and "--round-to 16" in verdict["why"]
    table = costs_table({"before": {}, "after": {}, "latency": {**_latency((1, 1.0, 0.8), (64, 10.0, 12.5)),
                                                               "verdict": verdict}})
    cells = {row[0]: row[3] for row in table.rows}
    assert cells["latency batch 64 (median ms)"] == "1.250x SLOWER"
    assert cells["latency batch 1 (median ms)"] == "0.800x"
    assert "--round-to 16" in table.caption


def test_slower_with_aligned_widths_says_so() -> None:
    aligned = {"conv1": {"before": 32, "after": 16}}
    verdict = speed_verdict(_latency((1, 1.0, 1.1)), aligned, block=16)
    assert verdict["slower_batches"] == [1] and "every kept width is a multiple of 16" in verdict["why"]


def _compile(tmp_path: Path, *extra: str) -> Any:
    return CliRunner().invoke(app, ["compile", MLP, "--data", "digits", "--importance", "l1", "--flops-budget",
                                    "0.5", "-o", str(tmp_path / "m.onnx"), "--batch", "1,8", *extra])


def test_require_speedup_fails_cleanly_and_writes_nothing(tmp_path: Path) -> None:
    run = _compile(tmp_path, "--require-speedup", "1000", "--report", str(tmp_path / "r.json"))
    assert run.exit_code == 1, run.stderr
    [line] = run.stderr.strip().splitlines()
    assert line.startswith("error: the compiled network is ") and "below the required speed-up 1000" in line
    assert list(tmp_path.iterdir()) == []


def test_require_speedup_needs_the_measurement(tmp_path: Path) -> None:
    run = _compile(tmp_path, "--require-speedup", "1", "--no-bench")
    assert run.exit_code == 2 and "--require-speedup needs the latency measurement" in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_probe_reads_the_block_and_alignments_off_onnxruntimes_own_graph() -> None:
    """The oracle is onnxruntime: the probed rules predict which convolutions it blocks, and how wide."""
    from oamipc.hardware import _blocked_out, conv_paths

    paths = conv_paths()
    if paths is None:
        pytest.skip("this onnxruntime build has no blocked (NCHWc) CPU convolutions")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        b = paths.block
        assert _blocked_out(b, b + 1, 1, tmp) == 2 * b  # outputs are padded up to whole blocks
        assert _blocked_out(b + paths.in_align, b, 1, tmp) is not None
        if paths.in_align > 1:
            assert _blocked_out(b + paths.in_align // 2, b, 1, tmp) is None
        assert _blocked_out(b - 1, b, 1, tmp) is not None  # narrower than a block: read directly
        d = b + paths.depthwise_align
        assert _blocked_out(d, d, d, tmp) is not None
        for width in range(1, 3 * b):
            assert paths.fast_input(width) == (_blocked_out(width, b, 1, tmp) is not None), width


def test_channel_block_falls_back_to_the_cpu_flags_when_the_probe_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import oamipc.hardware as hw

    monkeypatch.setattr(hw, "conv_paths", lambda: None)
    assert hw.cpu_channel_block() == hw.flags_channel_block(hw.cpu_flags())


def test_the_probes_answer_is_kept_on_disk_and_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import oamipc.hardware as hw

    monkeypatch.setenv("OAMIPC_CACHE_DIR", str(tmp_path))
    fresh = hw.probe_conv_paths()  # the oracle: onnxruntime asked now
    calls = []

    def probe() -> tuple[bool, hw.ConvPaths | None]:
        calls.append(1)
        return fresh

    monkeypatch.setattr(hw, "probe_conv_paths", probe)
    hw.conv_paths.cache_clear()
    try:
        assert hw.conv_paths() == fresh[1] and len(calls) == 1
        stored = json.loads((tmp_path / hw.PROBE_FILE).read_text())
        assert list(stored) == [hw.probe_key()]
        hw.conv_paths.cache_clear()
        assert hw.conv_paths() == fresh[1] and len(calls) == 1  # read back, no probe
        (tmp_path / hw.PROBE_FILE).write_text(json.dumps({"another machine": {"block": 8, "in_align": 8,
                                                                               "depthwise_align": 8}}))
        hw.conv_paths.cache_clear()
        assert hw.conv_paths() == fresh[1] and len(calls) == 2  # another key: probed, and both kept
        assert set(json.loads((tmp_path / hw.PROBE_FILE).read_text())) == {"another machine", hw.probe_key()}
        (tmp_path / hw.PROBE_FILE).write_text("{not json")
        hw.conv_paths.cache_clear()
        assert hw.conv_paths() == fresh[1] and len(calls) == 3  # unreadable: probed again
        monkeypatch.setattr(hw, "probe_conv_paths", lambda: (False, None))  # a failed probe is not kept
        (tmp_path / hw.PROBE_FILE).unlink()
        hw.conv_paths.cache_clear()
        assert hw.conv_paths() is None and not (tmp_path / hw.PROBE_FILE).exists()
    finally:
        hw.conv_paths.cache_clear()

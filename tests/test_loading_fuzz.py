"""Fuzzing the model loader: whatever the bytes, ``load_model`` raises an ``OamipcError`` or loads.

Inputs are random bytes, and truncated or mutated copies of valid files: a shipped example
checkpoint (``examples/digits_mlp.pt``), a ``torch.export`` program made from it, and hostile
variants of both that carry a pickle which, if it were ever unpickled, would create a canary file.
Mutations work on the raw bytes (truncation, overwritten and inserted bytes) and, for the zip
archives, on one entry's content with the archive rewritten around it, so the mutated entry gets
past the zip checksums and reaches torch's own readers.

The properties: any exception is an :class:`~oamipc.errors.OamipcError` with a one-line message
(never a bare ``RuntimeError``, ``KeyError``, ``zipfile.BadZipFile`` ...), a successful load is an
``nn.Module`` in eval mode, and the canary never appears (no code from a file runs without
``--trust-pickle``).  The examples are derandomised and bounded (30 per target) so CI stays fast and
deterministic; ``OAMIPC_FUZZ_EXAMPLES=k`` multiplies the count by ``k`` (as in tests/test_fuzz.py)
to search harder.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from oamipc.errors import OamipcError
from oamipc.loading import load_model

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits_mlp.pt"
EXAMPLES = 30 * max(1, int(os.environ.get("OAMIPC_FUZZ_EXAMPLES", "1")))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Canary:
    """Unpickling this creates ``path``: the stand-in for a command a hostile file would run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


@dataclass(frozen=True)
class Seeds:
    """Valid and hostile files to mutate, the canary path, and a scratch directory."""

    files: dict[str, bytes]
    canary: Path
    scratch: Path


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _replace_entries(archive: bytes, replace: dict[str, bytes], add: dict[str, bytes] | None = None) -> bytes:
    """``archive`` with the entries whose names end with a key of ``replace`` swapped, plus ``add``."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new
            dst.writestr(info, data)
        for name, data in (add or {}).items():
            dst.writestr(name, data)
    return out.getvalue()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    root = tmp_path_factory.mktemp("fuzz")
    canary = root / "canary"
    payload = _torch_bytes(Canary(canary))
    checkpoint = EXAMPLE.read_bytes()
    model = load_model(EXAMPLE)
    program = torch.export.export(model, (torch.randn(2, 1, 8, 8),))
    pt2_buf = io.BytesIO()
    torch.export.save(program, pt2_buf)
    pt2 = pt2_buf.getvalue()
    with zipfile.ZipFile(io.BytesIO(checkpoint)) as zf:
        pickle_entry = next(n for n in zf.namelist() if n.endswith("data.pkl"))
    with zipfile.ZipFile(io.BytesIO(payload)) as zf:
        hostile_pickle = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    from torch._export.serde.schema import SCHEMA_VERSION
    from torch._export.serde.serialize import serialize

    with zipfile.ZipFile(io.BytesIO(pt2)) as zf:
        config_entry = next(n for n in zf.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(zf.read(config_entry))
    # A declared shape that does not fit its bytes makes the current layout fail to load.
    meta = next(iter(config["config"].values()))["tensor_meta"]
    meta["sizes"][0]["as_int"] *= 2
    legacy = serialize(program)

    files = {
        "checkpoint": checkpoint,
        "pt2": pt2,
        # The checkpoint's pickle swapped for one that runs code (its storages stay in place).
        "hostile checkpoint": _replace_entries(checkpoint, {pickle_entry.split("/", 1)[1]: hostile_pickle}),
        "hostile pickle": payload,
        "hostile pt2 sample inputs": _replace_entries(pt2, {"sample_inputs/model.pt": payload}),
        # torch.export.load falls back to a pre-2.8 layout of top-level entries (whose state dict
        # it unpickles with weights_only=False) when the current layout fails to load.
        "hostile pt2 legacy fallback": _replace_entries(
            pt2, {"model_weights_config.json": json.dumps(config).encode()},
            {"version": f"{SCHEMA_VERSION[0]}.{SCHEMA_VERSION[1]}".encode(),
             "serialized_exported_program.json": legacy.exported_program, "serialized_state_dict.pt": payload,
             "serialized_constants.pt": legacy.constants, "serialized_example_inputs.pt": legacy.example_inputs}),
    }
    return Seeds(files, canary, root)


def _check_load(seeds: Seeds, data: bytes, name: str = "fuzzed.pt") -> None:
    """The fuzz property for one input file."""
    path = seeds.scratch / name
    path.write_bytes(data)
    try:
        model = load_model(path)
    except OamipcError as exc:
        assert "\n" not in str(exc)
        assert str(exc)
    else:
        assert isinstance(model, nn.Module) and not model.training
    assert not seeds.canary.exists(), "a file ran code while being loaded without --trust-pickle"


def test_seeds_behave(seeds: Seeds) -> None:
    """The unmutated seeds: the valid ones load, every hostile one is refused without running."""
    for name in ("checkpoint", "pt2"):
        path = seeds.scratch / f"seed-{name.replace(' ', '-')}"
        path.write_bytes(seeds.files[name])
        assert isinstance(load_model(path), nn.Module)
    for name, data in seeds.files.items():
        if name.startswith("hostile"):
            path = seeds.scratch / f"seed-{name.replace(' ', '-')}"
            path.write_bytes(data)
            with pytest.raises(OamipcError, match="trust-pickle"):
                load_model(path)
    assert not seeds.canary.exists()


@FUZZ
@given(data=st.binary(min_size=0, max_size=4096))
def test_random_bytes(seeds: Seeds, data: bytes) -> None:
    _check_load(seeds, data)


@st.composite
def _byte_mutation(draw: st.DrawFn, original: bytes) -> bytes:
    """Truncate, overwrite a few bytes, or insert a few bytes, anywhere in ``original``."""
    kind = draw(st.sampled_from(["truncate", "overwrite", "insert"]))
    data = bytearray(original)
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        chunk = draw(st.binary(min_size=1, max_size=8))
        if kind == "overwrite":
            data[at:at + len(chunk)] = chunk
        else:
            data[at:at] = chunk
    return bytes(data)


@st.composite
def _entry_mutation(draw: st.DrawFn, archive: bytes) -> bytes:
    """One zip entry's content mutated (or emptied), the archive rewritten with valid checksums."""
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        names = [info.filename for info in zf.infolist()]
        victim = draw(st.sampled_from(names))
        content = zf.read(victim)
    if content and draw(st.booleans()):
        new = draw(_byte_mutation(content))
    elif victim.endswith(".json") and content:
        new = _mutate_json(draw, content)
    else:
        new = draw(st.binary(max_size=64))
    return _replace_entries(archive, {victim: new})


def _mutate_json(draw: st.DrawFn, content: bytes) -> bytes:
    """A JSON entry with one number replaced by a hostile one (huge, negative, zero)."""
    text = content.decode("utf-8", errors="replace")
    digits = [i for i, ch in enumerate(text) if ch.isdigit() and (i == 0 or not text[i - 1].isdigit())]
    if not digits:
        return content
    at = draw(st.sampled_from(digits))
    end = at
    while end < len(text) and text[end].isdigit():
        end += 1
    value = draw(st.sampled_from(["0", "-1", "1000000000000", "4294967296", "7"]))
    return (text[:at] + value + text[end:]).encode()


@FUZZ
@given(choice=st.sampled_from(["checkpoint", "hostile checkpoint", "hostile pickle"]), data=st.data())
def test_mutated_checkpoints(seeds: Seeds, choice: str, data: st.DataObject) -> None:
    original = seeds.files[choice]
    mutated = data.draw(_entry_mutation(original) if choice != "hostile pickle" and data.draw(st.booleans())
                        else _byte_mutation(original))
    _check_load(seeds, mutated)


@FUZZ
@given(choice=st.sampled_from(["pt2", "hostile pt2 sample inputs", "hostile pt2 legacy fallback"]),
       data=st.data())
def test_mutated_exported_programs(seeds: Seeds, choice: str, data: st.DataObject) -> None:
    original = seeds.files[choice]
    mutated = data.draw(_entry_mutation(original) if data.draw(st.booleans()) else _byte_mutation(original))
    _check_load(seeds, mutated, "fuzzed.pt2")


def test_declared_huge_shapes_in_a_weights_config_fail_fast(seeds: Seeds) -> None:
    """A .pt2 whose weights config declares a 10^12-element tensor: refused, nothing allocated."""
    with zipfile.ZipFile(io.BytesIO(seeds.files["pt2"])) as zf:
        name = next(n for n in zf.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(zf.read(name))
    meta = next(iter(config["config"].values()))["tensor_meta"]
    meta["sizes"] = [{"as_int": 10**6}, {"as_int": 10**6}]
    meta["strides"] = [{"as_int": 10**6}, {"as_int": 1}]
    path = seeds.scratch / "huge.pt2"
    path.write_bytes(_replace_entries(seeds.files["pt2"], {"model_weights_config.json": json.dumps(config).encode()}))
    with pytest.raises(OamipcError) as err:
        load_model(path)
    assert "huge.pt2" in str(err.value) and "\n" not in str(err.value)

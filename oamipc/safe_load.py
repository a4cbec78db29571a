"""Read model files without running code from them, unless the user trusts the file.

Unpickling runs arbitrary code, so this module owns every read of a model file's bytes:

* :func:`archive_kind` tells a ``torch.export`` archive, a TorchScript archive and a
  ``torch.save`` zip apart by their entries (never by the file name);
* :func:`torch_load` reads a ``torch.save`` file with ``torch.load(weights_only=True)`` and
  unpickles it fully (or a plain ``pickle.dump`` stream) only with ``trust_pickle``
  (``--trust-pickle``); a refused global is named, damaged bytes become a one-line error;
* :func:`read_exported` runs ``torch.export.load`` only after checking every entry that it
  would unpickle: each must load with ``weights_only=True`` (``torch.export.load`` otherwise
  falls back to full pickle), and custom objects and native code are refused.

Every failure is a one-line :class:`~oamipc.errors.LoadError`.  What is done with the objects read
here belongs to :mod:`oamipc.checkpoint` (state dicts) and :mod:`oamipc.lifting` (programs).
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from oamipc.errors import LoadError, describe, first_few, first_line

__all__ = ["archive_kind", "check_readable", "read_exported", "torch_load"]

log = logging.getLogger("oamipc.loading")  # one logger for all of loading: the name users see and filter on

_LINE = 200  # longest quote of a wrapped exception in a message


# --------------------------------------------------------------------------------------------
# Files and formats
# --------------------------------------------------------------------------------------------


def check_readable(file: Path) -> None:
    """Existence, kind and size checks that give better messages than torch.load."""
    if not file.exists():
        raise LoadError(f"model file {file} does not exist; check the path")
    if file.is_dir():
        raise LoadError(f"{file} is a directory, not a model file; pass the .pt/.pth/.pt2 file in it")
    try:
        size = file.stat().st_size
    except OSError as exc:
        raise LoadError(f"cannot read {file} ({first_line(exc, limit=_LINE)}); check its permissions") from exc
    if size == 0:
        raise LoadError(f"{file} is empty (0 bytes); the model was not saved completely, save it again")


def archive_kind(file: Path) -> str | None:
    """'pt2', 'torchscript' or 'torch' for a readable zip archive, None for anything else."""
    try:
        with zipfile.ZipFile(file) as zf:
            names = zf.namelist()
    except Exception:  # noqa: BLE001 - a damaged directory makes zipfile raise many types
        return None  # legacy torch.save format, or corrupt: torch.load will tell
    inner = {name.split("/", 1)[1] for name in names if "/" in name}
    if "archive_format" in inner:
        return "pt2"
    if "constants.pkl" in inner or any(name.startswith("code/") for name in inner):
        return "torchscript"
    return "torch"


def torch_load(file: Path, *, trust_pickle: bool) -> object:
    """``torch.load`` with weights only; full unpickling only when the user trusts the file."""
    plain = _is_plain_pickle(file)
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write; the refusal below says more.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _unsafe_global(exc) or ("a plain pickle.dump stream" if plain else None)
        if found is None:
            raise _corrupt(file, exc) from exc
        if not trust_pickle:
            raise LoadError(
                f"{file} holds a pickled Python object ({found}); unpickling runs arbitrary code "
                f"from the file, so it was refused: pass --trust-pickle only if you trust the "
                f"file, or save a state dict instead (torch.save(model.state_dict(), ...))"
            ) from exc
        log.warning("unpickling %s with weights_only=False (--trust-pickle); it needs %s", file, found)
    except Exception as exc:
        if plain and not trust_pickle:
            raise LoadError(
                f"{file} is a plain Python pickle (pickle.dump), and unpickling runs arbitrary "
                f"code from the file, so it was refused: pass --trust-pickle only if you trust "
                f"the file, or save a state dict instead (torch.save(model.state_dict(), ...))"
            ) from exc
        if not plain:
            raise _corrupt(file, exc) from exc
    try:
        if plain:
            with open(file, "rb") as handle:
                return pickle.load(handle)  # noqa: S301 - the user passed --trust-pickle
        return torch.load(file, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        raise LoadError(
            f"{file} is a pickle of code that cannot be imported here ({first_line(exc, limit=_LINE)}); run "
            f"oamipc where the model's module is importable, or save a state dict instead"
        ) from exc
    except Exception as exc:
        raise LoadError(f"unpickling {file} failed ({describe(exc, limit=_LINE)}); save a state dict instead") from exc


# torch.save's legacy (non-zip) format starts with its pickled magic number.
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:12]


def _is_plain_pickle(file: Path) -> bool:
    """A ``pickle.dump`` stream (protocol 2+) rather than a torch.save file."""
    with open(file, "rb") as handle:
        head = handle.read(len(_LEGACY_TORCH_MAGIC))
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and head != _LEGACY_TORCH_MAGIC


def _unsafe_global(exc: BaseException) -> str | None:
    """The global a weights-only unpickler refused, or None when the data was just corrupt."""
    text = str(exc)
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if match:
        return match.group(1)
    if "global" in text.lower() and "GLOBAL" in text:
        return "a Python global"
    return None


def _corrupt(file: Path, exc: BaseException) -> LoadError:
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # skip torch's paragraph about weights_only defaults
        reason = first_line(text.split("WeightsUnpickler error:", 1)[1])
    else:
        reason = first_line(exc, limit=_LINE).split(". ")[0]
    if "can't allocate memory" in text or "alloc_cpu" in text:
        return LoadError(
            f"{file} declares tensors too large to allocate ({type(exc).__name__}: {reason}); the "
            f"file is damaged or was not written by torch.save: save the model again"
        )
    return LoadError(
        f"{file} is not a readable PyTorch file (truncated, corrupt or another format: "
        f"{type(exc).__name__}: {reason}); save the model again with "
        f"torch.save(model.state_dict(), ...) or torch.export.save"
    )


# --------------------------------------------------------------------------------------------
# torch.export archives
# --------------------------------------------------------------------------------------------

# Entries of a .pt2 archive that are read as text or JSON, never unpickled.
_PT2_TEXT_ENTRIES = {
    "archive_format", "archive_version", "byteorder", "version", ".data/version",
    ".data/serialization_id", ".format_version", ".storage_alignment",
}
_PT2_CONFIG_ENTRY = re.compile(r"data/(weights|constants)/[^/]+_(weights|constants)_config\.json")
_PT2_JSON_ENTRY = re.compile(r"models/[^/]+\.json|data/(weights|constants)/[^/]+_config\.json|[^/]+\.json")


def read_exported(file: Path, *, trust_pickle: bool) -> torch.export.ExportedProgram:
    """``torch.export.load`` after checking that it will not unpickle untrusted objects."""
    if not trust_pickle:
        try:
            unsafe = _pt2_pickled_payloads(file)
        except Exception as exc:
            raise LoadError(
                f"{file} is a damaged torch.export archive ({describe(exc, limit=_LINE)}); export the model "
                f"again with torch.export.save"
            ) from exc
        if unsafe:
            raise LoadError(
                f"{file} is a torch.export archive holding pickled objects or native code "
                f"({first_few(unsafe)}) that torch.export.load would run; pass --trust-pickle only "
                f"if you trust the file, or re-export it with torch.export.save from plain tensors"
            )
    with _TorchExportLog() as torch_log:
        try:
            with open(file, "rb") as handle:
                program = torch.export.load(handle)
        except Exception as exc:
            raise LoadError(
                f"{file} looks like a torch.export archive but cannot be loaded "
                f"({torch_log.cause() or describe(exc, limit=_LINE)}); re-export it with torch.export.save "
                f"from this torch version ({torch.__version__})"
            ) from exc
    return program


class _TorchExportLog(logging.Handler):
    """Keeps torch.export.load's own log records off the terminal while it runs.

    When an archive fails to load, torch logs the real cause with its traceback as a warning,
    then tries an older layout and raises a vague "check the warnings above" error.  The records
    are collected here instead (and re-logged at debug level), so the user sees one line that
    names the real cause.
    """

    _LOGGERS = ("torch.export", "torch._export")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> _TorchExportLog:
        for name in self._LOGGERS:
            logger = logging.getLogger(name)
            # torch gives these loggers their own stderr handlers: swap them out, not just add.
            self._saved.append((logger, list(logger.handlers), logger.propagate))
            logger.handlers = [self]
            logger.propagate = False
        return self

    def __exit__(self, *exc: object) -> None:
        for logger, handlers, propagate in self._saved:
            logger.handlers = handlers
            logger.propagate = propagate
        for record in self.records:
            log.debug("torch.export.load: %s", _record_text(record))

    def cause(self) -> str | None:
        """The first exception torch logged while loading, as ``Type: first line``."""
        for record in self.records:
            if record.exc_info and record.exc_info[1] is not None:
                return describe(record.exc_info[1], limit=_LINE)
        return None


def _record_text(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # noqa: BLE001 - torch has logged records whose arguments do not match
        return str(record.msg)


def _pt2_pickled_payloads(file: Path) -> list[str]:
    """Archive entries that torch.export.load would unpickle and that are not weights-only safe.

    Fail-closed: anything that is not a known text/JSON entry or a raw tensor payload declared
    ``use_pickle: false`` must load with ``torch.load(weights_only=True)``; custom/opaque
    objects and AOTInductor code are always reported.  Every copy of a duplicated entry is
    checked, since zip readers disagree about which one wins.  Top-level entries (outside the
    archive's folder) are checked too: when the current layout fails to load, torch.export.load
    falls back to an older one made of top-level ``serialized_*.pt`` entries, which it unpickles
    with ``weights_only=False`` if the safe load fails.
    """
    unsafe: list[str] = []
    with zipfile.ZipFile(file) as zf:
        infos = [(info, info.filename.split("/", 1)[1] if "/" in info.filename else info.filename)
                 for info in zf.infolist()]
        raw_payloads, pickled_payloads = _pt2_payloads(zf, infos)
        for info, name in infos:
            if info.is_dir():
                continue
            if name not in pickled_payloads and (
                name in _PT2_TEXT_ENTRIES or name.startswith("extra/") or _PT2_JSON_ENTRY.fullmatch(name)
            ):
                continue
            if name.startswith(("data/aotinductor/", "data/executorch/", "data/mtia")):
                unsafe.append(name)
            elif name in raw_payloads:
                continue
            elif name.rsplit("/", 1)[-1].startswith(("custom_obj_", "opaque_obj_")):
                unsafe.append(name)
            elif not _loads_weights_only(zf.read(info)):
                unsafe.append(name)
    return unsafe


def _pt2_payloads(
    zf: zipfile.ZipFile, infos: list[tuple[zipfile.ZipInfo, str]]
) -> tuple[set[str], set[str]]:
    """(entries declared raw tensor bytes only, entries that some config has unpickled).

    An entry that any config entry marks ``use_pickle`` is not raw, whatever the others say.
    """
    raw: set[str] = set()
    pickled: set[str] = set()
    for info, name in infos:
        match = _PT2_CONFIG_ENTRY.fullmatch(name)
        if not match:
            continue
        try:
            config = json.loads(zf.read(info)).get("config", {})
        except (ValueError, AttributeError):
            continue  # unparsable: its payloads stay unknown and get checked
        folder = f"data/{match.group(1)}/"
        for meta in config.values() if isinstance(config, dict) else ():
            path_name = meta.get("path_name") if isinstance(meta, dict) else None
            if not isinstance(path_name, str):
                continue
            if meta.get("use_pickle") is False and path_name.startswith(("weight_", "tensor_")):
                raw.add(folder + path_name)
            else:
                pickled.add(folder + path_name)
    return raw - pickled, pickled


def _loads_weights_only(data: bytes) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not provably safe"
        return False
    return True

"""The folder of a custom (non-``HFEncoder``) tower: rebuild the class from its import path, load its weights.

A custom tower class is saveable when it defines ``get_config(self) -> dict`` (JSON-serialisable constructor
keyword arguments, so that ``cls(**config)`` rebuilds the module) and is importable by its dotted path
(``type(tower).__module__`` + ``__qualname__``): not defined in ``__main__`` nor inside a function. Folder::

    tower.json           {"class": "my_towers.BagOfWords", "config": {...}, "format_version": 1}
    model.safetensors    the module's state dict (safetensors, no pickle)
    tokenizer files      tokenizer.save_pretrained

Loading imports the class with :mod:`importlib`, so its module must be importable in the loading process
(installed, or on ``PYTHONPATH``).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dualenc.errors import InputError
from dualenc.io.atomic import write_json
from dualenc.io.input_files import read_json

TOWER_FILE = "tower.json"
WEIGHTS_FILE = "model.safetensors"
TOWER_FORMAT_VERSION = 1


def is_custom_tower_dir(folder: str | Path) -> bool:
    """True when ``folder`` holds a custom tower (a ``tower.json``)."""
    return (Path(folder) / TOWER_FILE).is_file()


def tower_spec(tower: nn.Module) -> dict[str, Any]:
    """The ``tower.json`` content for ``tower``; a ``TypeError`` naming class and fix if it is unsaveable."""
    dotted = _class_path(tower)
    config = tower.get_config()
    if not isinstance(config, dict):
        raise TypeError(f"cannot save the custom tower {dotted}: get_config() must return a dict")
    try:
        json.dumps(config)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"cannot save the custom tower {dotted}: get_config() is not JSON-serialisable ({err})"
        ) from err
    return {"class": dotted, "config": config, "format_version": TOWER_FORMAT_VERSION}


def _class_path(tower: nn.Module) -> str:
    """The dotted import path of ``tower``'s class; ``TypeError`` when another process could not import it."""
    cls = type(tower)
    dotted = f"{cls.__module__}.{cls.__qualname__}"
    fix = None
    if not callable(getattr(tower, "get_config", None)):
        fix = (
            f"it has no get_config() method; add `def get_config(self) -> dict` returning the constructor "
            f"keyword arguments, so that {cls.__qualname__}(**config) rebuilds it"
        )
    elif cls.__module__ == "__main__":
        fix = (
            "it is defined in __main__ (the script being run), which another process cannot import; move it "
            "to a module file (e.g. my_towers.py) on PYTHONPATH and import it from there"
        )
    elif "<locals>" in cls.__qualname__:
        fix = "it is defined inside a function; define it at the top level of an importable module"
    else:
        try:
            import_class(dotted)
        except InputError as err:
            fix = err.problem
    if fix is not None:
        raise TypeError(f"cannot save the custom tower {dotted}: {fix}")
    return dotted


def import_class(dotted: str, *, path: str | Path | None = None) -> type:
    """Import ``package.module.Class`` (nested classes too); failures raise ``InputError`` naming ``path``."""
    parts = dotted.split(".")
    not_found: ModuleNotFoundError | None = None
    for split in range(len(parts) - 1, 0, -1):  # the longest importable module prefix, then attributes
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and module_name.startswith(err.name):
                not_found = err
                continue  # this prefix is not a module; try a shorter one
            raise _not_importable(dotted, err, path) from err
        except ImportError as err:
            raise _not_importable(dotted, err, path) from err
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError as err:
            raise _not_importable(dotted, err, path) from err
        if not isinstance(obj, type):
            raise InputError(f"{dotted} is not a class", path=path)
        return obj
    raise _not_importable(dotted, not_found or ModuleNotFoundError(f"No module named {dotted!r}"), path)


def _not_importable(dotted: str, err: Exception, path: str | Path | None) -> InputError:
    return InputError(
        f"cannot import the tower class {dotted} ({type(err).__name__}: {err}); its module must be "
        "importable by the loading process (installed, or its folder on PYTHONPATH)",
        path=path,
    )


def write_custom_tower(folder: Path, tower: nn.Module, tokenizer: Any) -> None:
    """Write ``tower.json``, ``model.safetensors`` and the tokenizer into ``folder``."""
    from safetensors.torch import save_file

    spec = tower_spec(tower)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_state_for_saving(tower), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    write_json(folder / TOWER_FILE, spec)


def _state_for_saving(tower: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as contiguous tensors; one sharing storage with an earlier one (tied weights) is copied.

    safetensors refuses shared storage; loading copies values back into each name, so ties survive.
    """
    state, seen = {}, set()
    for name, tensor in tower.state_dict().items():
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        state[name] = tensor.clone().contiguous() if storage in seen else tensor.contiguous()
        seen.add(storage)
    return state


def load_custom_tower(folder: str | Path, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild the tower of ``folder``: import its class, ``cls(**config)``, load the weights strictly.

    Args:
        folder: a folder written by :func:`write_custom_tower`.
        dtype: cast floating-point weights to it; None keeps the saved dtype (when all are one dtype).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    spec_path, weights_path = folder / TOWER_FILE, folder / WEIGHTS_FILE
    spec = read_json(spec_path)
    if not isinstance(spec, dict) or not isinstance(spec.get("class"), str):
        raise InputError('expected a JSON object with a "class" string', path=spec_path)
    version = spec.get("format_version", TOWER_FORMAT_VERSION)
    if version != TOWER_FORMAT_VERSION:
        raise InputError(
            f"format_version {version!r} is not supported (this dualenc reads {TOWER_FORMAT_VERSION})",
            path=spec_path,
        )
    config = spec.get("config", {})
    if not isinstance(config, dict):
        raise InputError('"config" must be a JSON object of constructor arguments', path=spec_path)
    dotted = spec["class"]
    cls = import_class(dotted, path=spec_path)
    try:
        tower = cls(**config)
    except TypeError as err:
        raise InputError(f"{dotted}(**config) failed: {err}", path=spec_path) from err
    if not weights_path.is_file():
        raise InputError("file not found", path=weights_path)
    state = load_file(str(weights_path))
    _check_state(tower, state, dotted, weights_path)
    tower.load_state_dict(state, strict=True)
    saved = {t.dtype for t in state.values() if t.is_floating_point()}
    if dtype is None and len(saved) == 1:
        dtype = saved.pop()
    return tower if dtype is None else tower.to(dtype)


def _check_state(tower: nn.Module, state: dict[str, torch.Tensor], dotted: str, path: Path) -> None:
    """Refuse, in one line, weights that do not fit the rebuilt module (missing, unexpected, reshaped)."""
    expected = tower.state_dict()
    problems = []
    for label, names in (("missing", expected.keys() - state), ("unexpected", state.keys() - expected)):
        if names:
            problems.append(f"{label} {', '.join(sorted(names)[:5])}{' …' if len(names) > 5 else ''}")
    reshaped = sorted(n for n in expected.keys() & state if expected[n].shape != state[n].shape)
    if reshaped:
        name = reshaped[0]
        problems.append(
            f"shape of {name} is {tuple(state[name].shape)} in the file, {tuple(expected[name].shape)} in "
            f"the module" + (f" (and {len(reshaped) - 1} more)" if len(reshaped) > 1 else "")
        )
    if problems:
        raise InputError(f"weights do not fit {dotted}(**config): {'; '.join(problems)}", path=path)

"""Loading the agent classes of an application module (`--app`): a file path or a dotted name."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from ._agent import Agent
from ._errors import ConfigurationError


def load_module(ref: str) -> ModuleType:
    path = Path(ref)
    try:
        if ref.endswith(".py") or path.is_file():
            if not path.is_file():
                raise ConfigurationError(f"app file not found: {ref}")
            name = f"accord_app_{path.stem}"
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise ConfigurationError(f"cannot load app file {ref}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return module
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        return importlib.import_module(ref)
    except ConfigurationError:
        raise
    except ModuleNotFoundError as exc:
        raise ConfigurationError(f"cannot import app {ref!r}: {exc}") from None
    except Exception as exc:  # the user's module raised while importing
        raise ConfigurationError(
            f"app {ref!r} failed to import: {type(exc).__name__}: {exc}"
        ) from None


def agent_classes(module: ModuleType) -> list[type[Agent]]:
    """`AGENTS` if the module defines it, else every Agent subclass defined in the module."""
    declared = getattr(module, "AGENTS", None)
    if declared is not None:
        classes = list(declared)
    else:
        classes = [
            obj
            for obj in vars(module).values()
            if isinstance(obj, type)
            and issubclass(obj, Agent)
            and obj is not Agent
            and obj.__module__ == module.__name__
        ]
    if not classes:
        raise ConfigurationError(f"app {module.__name__!r} defines no accord.Agent classes")
    return classes

"""lowrank_train.train's exports: no submodule shares a name with an exported function (no module class swap)."""

import importlib
import pkgutil
import types

import lowrank_train.train as package


def test_no_submodule_is_named_like_an_export():
    modules = {info.name for info in pkgutil.iter_modules(package.__path__)}
    assert not modules & set(package.__all__)


def test_exports_stay_what_they_are_after_every_submodule_is_imported():
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    for name in package.__all__:
        assert not isinstance(getattr(package, name), types.ModuleType), name

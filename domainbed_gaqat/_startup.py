"""Interpreter start-up hook, run by ``domainbed_gaqat.pth``.

It imports nothing heavy (not even ``importlib.abc``, which pulls in ``typing``, ``tempfile``
and ``importlib.resources``; the finder and loader protocols are duck-typed): it only puts a
finder on ``sys.meta_path`` that, once one of DomainBed's registries (``domainbed.algorithms``,
``hparams_registry``, ``datasets``, ``command_launchers``, ``lib.reporting``,
``model_selection``) or ``domainbed.networks`` (its featurizer factory) has executed, adds the
plugin's entries to it. Set
``DOMAINBED_GAQAT_DISABLE=1`` to opt out. A failure while patching is reported as a warning and
never stops the interpreter or DomainBed.
"""

import os
import sys
import warnings

TARGETS = (
    "domainbed.networks",
    "domainbed.algorithms",
    "domainbed.hparams_registry",
    "domainbed.datasets",
    "domainbed.command_launchers",
    "domainbed.lib.reporting",
    "domainbed.model_selection",
)
# Plugin modules that import a DomainBed registry. Imported first (``from
# domainbed_gaqat.plugin.algorithms import LSQ`` before any ``import domainbed``), they are still
# executing when that registry finishes, so it is patched when they finish instead.
PLUGIN_MODULES = {
    "domainbed_gaqat.plugin.algorithms": "domainbed.algorithms",
    "domainbed_gaqat.plugin.datasets": "domainbed.datasets",
}
_executing: set = set()


class _PatchingLoader:
    def __init__(self, loader) -> None:
        self.loader = loader

    def __getattr__(self, name):  # get_source, get_filename, ...: the real loader's
        if name == "loader":  # not set yet (copy/pickle probe ``__setstate__``): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        name = module.__name__
        _executing.add(name)
        try:
            self.loader.exec_module(module)
        finally:
            _executing.discard(name)
        if name in PLUGIN_MODULES:
            name = PLUGIN_MODULES[name]
            if name not in sys.modules:
                return
        elif any(p in _executing for p, t in PLUGIN_MODULES.items() if t == name):
            return  # the plugin module importing this registry patches it when it finishes
        try:
            from domainbed_gaqat.plugin.register import patch

            patch(sys.modules[name])
        except Exception as err:  # never break DomainBed because of the plugin
            warnings.warn(f"domainbed_gaqat could not register into {name}: {err!r}",
                          stacklevel=2)


class _Finder:  # a meta path finder needs only ``find_spec``
    def find_spec(self, name, path, target=None):
        if name not in TARGETS and name not in PLUGIN_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def install() -> None:
    if os.environ.get("DOMAINBED_GAQAT_DISABLE", "").strip() not in ("", "0"):
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()

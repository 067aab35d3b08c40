"""Build hooks that install ``domainbed_gaqat.pth`` into site-packages.

The ``.pth`` file runs :mod:`domainbed_gaqat._startup` in every interpreter, so the
processes that DomainBed's sweep starts see the plugin without editing DomainBed. setuptools
installs no top-level ``.pth`` on its own: ``build_py`` covers ``pip install .``,
``editable_wheel`` covers ``pip install -e .``.
"""

import shutil
from pathlib import Path

from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = Path(__file__).with_name("domainbed_gaqat.pth")


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        shutil.copy(PTH, Path(self.build_lib, PTH.name))


class EditableWheelWithPth(editable_wheel):
    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        # setuptools writes everything under ``unpacked_wheel`` into the editable wheel.
        result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        shutil.copy(PTH, Path(unpacked_wheel, PTH.name))
        return result

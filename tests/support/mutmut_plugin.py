"""pytest plugin of ``make mutation`` (``-p tests.support.mutmut_plugin``; not used
otherwise).

mutmut runs the tests in ``./mutants``, whose copy of the package (mutated) comes first on
``sys.path``. ``domainbed_gaqat.pth`` imported the package at interpreter start-up, from the
checkout: forget that import, so the tests import the mutated copy.
"""

import os
import sys

for _name in [m for m in sys.modules if m.split(".")[0] == "domainbed_gaqat"]:
    del sys.modules[_name]

import domainbed_gaqat  # noqa: E402

if not domainbed_gaqat.__file__.startswith(os.getcwd() + os.sep):
    raise RuntimeError(f"{domainbed_gaqat.__file__} is not the copy under {os.getcwd()}")

"""Ships `nnunet_fseft-trainers.pth`, which lets nnU-Net find our trainers after
`pip install` with no user action (see nnunet_fseft/discovery.py)."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "nnunet_fseft-trainers.pth"
# One line; Python runs lines that start with `import` at start-up. Failures are swallowed
# so that a broken install can never stop an interpreter from starting.
PTH_LINE = ("import os; exec('try:\\n import nnunet_fseft.discovery as d; d.register()\\n"
            "except Exception:\\n pass')\n")


class build_py_with_pth(build_py):
    """`pip install .`: the file goes to the root of the wheel, i.e. site-packages."""

    def run(self):
        super().run()
        with open(os.path.join(self.build_lib, PTH_NAME), "w") as f:
            f.write(PTH_LINE)


class editable_wheel_with_pth(editable_wheel):
    """`pip install -e .` (PEP 660) builds its own wheel without build_py's output, so the
    file is added to that wheel here. Its name sorts after setuptools' `__editable__*.pth`,
    which makes the package importable first. Uses a private setuptools hook: if it ever
    changes, the editable install still works and `nnunet-fseft env` gives the export."""

    def _select_strategy(self, *args, **kwargs):
        return _AddPth(super()._select_strategy(*args, **kwargs))


class _AddPth:
    def __init__(self, strategy):
        self.strategy = strategy

    def __call__(self, wheel, files, mapping):
        wheel.writestr(PTH_NAME, PTH_LINE)
        return self.strategy(wheel, files, mapping)

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self.strategy.__exit__(*exc)


setup(cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})

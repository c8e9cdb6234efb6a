"""hpodlb: the head-node daemon that keeps HyperPod login nodes behind an NLB, with one SSH identity.

`hpodlb.__version__` is the installed distribution's version: pyproject.toml is its one source.
It is read from the package metadata only when asked for, because importing importlib.metadata
costs `hpodlb --help` tens of milliseconds.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    __version__: str
else:

    def __getattr__(name: str) -> str:
        if name != "__version__":
            raise AttributeError(f"module 'hpodlb' has no attribute {name!r}")
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("hpodlb")
        except PackageNotFoundError:  # a source tree on PYTHONPATH, never installed
            return "0+unknown"

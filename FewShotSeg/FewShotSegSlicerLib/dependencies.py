"""Python packages the engine needs besides PyTorch, installed on first use only.

Why: installing at import time freezes Slicer's start-up and surprises users; exact
pins break other extensions (NumPy ABI), so requirements are lower bounds at most.
PyTorch itself comes from the PyTorch extension (see the module widget).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging

import slicer

# import name -> pip requirement (no exact pins inside Slicer). Only what inference imports:
# scikit-image (training episodes), tqdm (the command line's progress bar) and the
# EfficientNet ImageNet weights (training from scratch) are never needed to propagate or
# refine, so an offline site is not asked for them.
PACKAGES = {
    "SimpleITK": "SimpleITK",
    "scipy": "scipy",
}


def missingPackages(packages: dict = PACKAGES) -> list[str]:
    """pip requirements whose module cannot be found (nothing is imported here)."""
    return [req for name, req in packages.items() if importlib.util.find_spec(name) is None]


def ensurePackages(askConfirmation: bool = True, packages: dict = PACKAGES) -> bool:
    """Install what is missing after the user agreed; False if the user declined."""
    missing = missingPackages(packages)
    if not missing:
        return True
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            "FewShotSeg needs these Python packages, which will be downloaded and installed now:\n"
            + "\n".join(missing), "Install Python packages"):
        return False
    logging.info("FewShotSeg: installing %s", ", ".join(missing))
    slicer.util.pip_install(" ".join(missing))
    importlib.invalidate_caches()
    still = missingPackages(packages)
    if still:
        from FewShotSegLib.errors import FewShotSegError

        raise FewShotSegError(f"installing {', '.join(still)} failed; see the Python console")
    return True


def torchAvailable() -> bool:
    return importlib.util.find_spec("torch") is not None


def ensureEngineDependencies(askConfirmation: bool = True) -> bool:
    """PyTorch through the PyTorch extension, then the small packages; False if declined."""
    if not torchAvailable():
        try:
            import PyTorchUtils
        except ImportError:
            from FewShotSegLib.errors import FewShotSegError

            raise FewShotSegError("PyTorch is needed: install the 'PyTorch' extension from the "
                                  "Extensions Manager, restart Slicer and try again") from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            try:
                try:
                    torch = torchLogic.installTorch(askConfirmation=askConfirmation, torchVersionRequirement=">=2.1")
                except TypeError:  # older PyTorchUtils without version arguments
                    torch = torchLogic.installTorch(askConfirmation=askConfirmation)
            except Exception as exc:  # noqa: BLE001 - pip's failure (offline, proxy) becomes what to do
                logging.exception("FewShotSeg: installing PyTorch failed")
                from FewShotSegLib.errors import FewShotSegError

                raise FewShotSegError(offlineTorchHelp(exc)) from None
            if torch is None:
                return False
    return ensurePackages(askConfirmation)


def offlineTorchHelp(exc: BaseException) -> str:
    """One line: why PyTorch did not install and how to install it without internet."""
    import sys

    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return (f"PyTorch could not be downloaded ({type(exc).__name__}; no internet?). Without internet: on a "
            f"computer with internet and the same operating system and Python {python}, run "
            "'pip download torch --index-url https://download.pytorch.org/whl/cpu -d torch_wheels', copy the "
            "torch_wheels folder here, run slicer.util.pip_install(['--no-index', '--find-links', FOLDER, 'torch']) "
            "in Slicer's Python console, and restart Slicer")

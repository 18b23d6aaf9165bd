"""Assembles the serve image's whole filesystem under one directory (run inside the Dockerfile's
build stage, with the base image's python3): a distroless-style root that holds the Python
interpreter, its standard library, the virtual environment and the shared libraries those load,
and nothing else (no shell, no package manager, no coreutils).

    python3 docker/serve_root.py VENV ROOT

Measured on the debootstrap bookworm base (docs/serving.md, Docker): the base image is 124 MB; this
root is ~24 MB without the venv (interpreter 7, stdlib zip 4, lib-dynload 2, shared
libraries 11) and the venv ~118 MB (192 MB untrimmed). The venv is trimmed in place first:
  - onnxruntime's C-API library capi/libonnxruntime.so.* (35 MB): the Python module is its
    own copy of the runtime (onnxruntime_pybind11_state.so) and never loads it;
  - `strip --strip-unneeded` on extension modules (~20 MB, mostly uvloop's debug symbols),
    but never on the wheels' bundled libraries (numpy.libs): auditwheel patched
    those with patchelf, and strip corrupts them (numpy no longer imports);
  - what serving never imports: tests, numpy's f2py/distutils/C headers, onnxruntime's
    model tools and their requirements (protobuf, flatbuffers, tqdm), pip/setuptools.
No Pillow: the service writes its PNGs with zlib (pipeline/core/png.py). tests/test_docker_image.py
compares the image's answers with the checkout's, byte for byte.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

# Standard-library parts a server never imports: test suites, GUI, REPL and packaging tools.
STDLIB_DROP = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "turtle.py",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "distutils",
    "venv",
    "sqlite3",
    "dbm",
    "curses",
    "site-packages",
    "dist-packages",
}
# Extension modules of the standard library a server never loads: CPython's own test
# modules, and those with system libraries behind them (_crypt and nis pull in Kerberos).
DYNLOAD_DROP = (
    "_test",
    "_ctypes_test",
    "_xxtestfuzz",
    "xxlimited",
    "_tkinter",
    "_sqlite3",
    "_dbm",
    "_gdbm",
    "_curses",
    "readline",
    "_crypt",
    "nis",
    "ossaudiodev",
)

# Installed as onnxruntime's requirements, for its model tools (dropped below) only; and pip.
VENV_UNINSTALL = ("protobuf", "flatbuffers", "tqdm", "pip", "setuptools")
# Inside site-packages: globs of what serving never loads.
VENV_DROP = [
    "onnxruntime/capi/libonnxruntime.so*",  # the C API; Python uses the pybind module
    "onnxruntime/transformers",
    "onnxruntime/quantization",
    "onnxruntime/tools",
    "onnxruntime/datasets",
    "numpy/f2py",
    "numpy/distutils",
    "numpy/_core/include",
    "numpy/_core/lib",  # static npymath and pkg-config files, for building against numpy
    "numpy/_pyinstaller",
    "numpy/testing/_private/extbuild.py",
    "numpy/_core/_simd*.so",  # SIMD test bindings, imported only by numpy's tests
    "numpy/*.pyi",
]


def run(*args: str, check: bool = True) -> str:
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout


def is_elf(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(4) == b"\x7fELF"


def trim_venv(venv: Path) -> None:
    site = next(venv.glob("lib/python3*/site-packages"))
    run(
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "uninstall",
        "--yes",
        "--disable-pip-version-check",
        *VENV_UNINSTALL,
    )
    for directory in site.iterdir():  # namespace dirs the uninstall left empty (google/)
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
    for tests in [*site.rglob("tests"), *site.rglob("testing/tests")]:
        shutil.rmtree(tests, ignore_errors=True)
    for pattern in VENV_DROP:
        for path in site.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    for module in site.rglob("*.so"):
        if not module.parent.name.endswith(".libs"):
            run("strip", "--strip-unneeded", str(module))


def copy_path(src: Path, root: Path) -> None:
    """Copies src (a file, or a symlink and what it points to) to the same path under root;
    directory symlinks on the way (/lib -> usr/lib) are resolved, root has its own."""
    dest = root / Path(os.path.realpath(src.parent)).relative_to("/") / src.name
    if dest.exists() or dest.is_symlink():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        target = src.readlink()
        dest.symlink_to(target)
        copy_path(Path(os.path.normpath(src.parent / target)), root)
    elif src.is_dir():
        shutil.copytree(src, dest, symlinks=True)
    else:
        shutil.copy2(src, dest)


def copy_stdlib(root: Path) -> None:
    """The pure-Python standard library as one zip of bytecode only (sys.path's own
    pythonXY.zip, as in CPython's embeddable distribution): 4 MB instead of ~22 MB of
    sources and __pycache__. Its tracebacks show file and line, not the line's text. Extension
    modules cannot load from a zip: lib-dynload stays a directory."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    dynload = Path(sysconfig.get_paths()["platstdlib"]) / "lib-dynload"
    zip_path = Path(next(entry for entry in sys.path if entry.endswith(".zip")))
    dest = root / zip_path.relative_to("/")
    dest.parent.mkdir(parents=True, exist_ok=True)

    def keep(path: str) -> bool:
        return not {"test", "tests", "idle_test"} & set(Path(path).parts)

    # Deflated only where zlib is built into the interpreter (Debian's): an interpreter whose
    # zlib is itself in lib-dynload (python:3.11-slim) gets a stored zip, still without sources.
    deflate = "zlib" in sys.builtin_module_names
    compression = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.PyZipFile(str(dest), "w", compression=compression) as archive:
        for entry in sorted(stdlib.iterdir()):
            if entry.name in STDLIB_DROP:
                continue
            if entry.suffix == ".py" or (entry / "__init__.py").is_file():
                archive.writepy(str(entry), filterfunc=keep)
    # The interpreter finds its prefix by this landmark; imports still come from the zip,
    # which is ahead of it on sys.path.
    copy_path(stdlib / "os.py", root)
    shutil.copytree(
        dynload,
        root / dynload.relative_to("/"),
        ignore=lambda _, names: {name for name in names if name.startswith(DYNLOAD_DROP)},
    )


def shared_libraries(root: Path) -> set[Path]:
    """Every library that an ELF file under root needs, resolved by the base image's loader."""
    needed: set[Path] = set()
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and is_elf(path):
            for line in run("ldd", str(path), check=False).splitlines():
                # "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-... (0x...)"
                parts = line.split()
                candidate = parts[2] if "=>" in parts else parts[0]
                if candidate.startswith("/") and not Path(candidate).is_relative_to(root):
                    needed.add(Path(candidate))
                elif "not found" in line:  # e.g. a library dropped above that is needed
                    sys.exit(f"serve_root: {path} needs {parts[0]}, which is not found")
    return needed


def main(venv: Path, root: Path) -> None:
    trim_venv(venv)
    root.mkdir(parents=True)
    # Merged-/usr symlinks (/lib -> usr/lib ...) as the base image has them.
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        if Path("/", top).is_symlink():
            (root / top).symlink_to(Path("/", top).readlink())
    # The venv's bin/python links to the base's interpreter (python -> python3 ->
    # /usr/bin/python3 -> python3.11): copy the chain from where it leaves the venv.
    link = venv / "bin" / "python"
    while link.is_relative_to(venv):
        link = Path(os.path.normpath(link.parent / link.readlink()))
    copy_path(link, root)
    copy_stdlib(root)
    copy_path(venv, root)
    for library in sorted(shared_libraries(root)):
        copy_path(library, root)
    # The service's user (a fixed id, for Kubernetes' runAsNonRoot), and a writable /tmp.
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/sbin/nologin\napp:x:10001:10001:app:/tmp:/sbin/nologin\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\napp:x:10001:\n")
    (root / "tmp").mkdir(exist_ok=True)
    (root / "tmp").chmod(stat.S_IRWXU | stat.S_IRWXG | stat.S_IRWXO | stat.S_ISVTX)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

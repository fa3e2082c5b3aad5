"""Every message that crosses a process boundary, typed, frozen and versioned, as JSON lines.

Holds the engine's events (``events``: ``Started``, ``Step``, ``Failed`` ... and ``parse_event``), the answers of
the engine's ``--json`` commands (``dataset_report``, ``device_report``, ``memory_report``, ``pairs_report``,
``run_lineage``, ``reward_scores``), the generation worker's requests and replies (``generation``) and a blocking
client for it (``generation_client``).

May import: the standard library and other core modules, nothing third-party
(import-linter: "The protocol's own modules import the standard library and core only").
"""

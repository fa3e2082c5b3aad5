"""What the app shows, kept apart from the widgets: the observable state objects the pages read and change.

Holds one run as the app shows it (``run``), the set-up page's form (``setup``), a labelling session
(``annotation``) and the Annotate page's labelling state (``annotate``), model facts read from its files
(``model_info``), live curves' columns (``series``), run names as a person reads them (``run_labels``), a run's log
(``run_log``), presets, the remembered settings and the observer they share (``observable``). Qt-free: each is
tested without a display.

May import: core, numpy; nothing else of the studio, the bottom of its layers, and no Qt (import-linter: "The
studio is layered", "The studio's state is Qt-free").
"""

"""What the app shows, kept apart from the widgets: the observable state objects the pages read and change.

Holds one run as the app shows it (``run``), the set-up page's form (``setup``), a labelling session
(``annotation``), the memory budget before a run (``estimate``), model facts read from its files
(``model_info``), live curves' columns (``series``), presets, the remembered settings and the observer they share
(``observable``). Qt-free except ``estimate``, which schedules its work on Qt's event loop.

May import: core, numpy (and Qt for ``estimate``); nothing else of the studio, the bottom of its layers
(import-linter: "The studio is layered").
"""

"""The widgets the pages are built from: charts, forms, panels, dialogs, the runs table, layout helpers.

May import: ``services``, ``state``, core, Qt and pyqtgraph; not the pages or the window
(import-linter: "The studio is layered").
"""

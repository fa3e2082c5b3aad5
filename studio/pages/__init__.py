"""The main window's pages: Set up, Train, Runs, Annotate (a sub-package) and Compare.

May import: ``widgets``, ``services``, ``state``, core and Qt; not the main window or the app
(import-linter: "The studio is layered").
"""

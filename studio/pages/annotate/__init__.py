"""The Annotate page: set up a labelling session, generate its candidates in the worker, label pairs, export.

Holds the page (``page``) and the views it is built from; its Qt-free session is ``studio.state.annotation`` and
its generation ``studio.services.annotation_generation``. May import what every page may: ``widgets``,
``services``, ``state``, core and Qt (import-linter: "The studio is layered").
"""

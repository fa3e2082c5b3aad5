"""The training engine: runs in its own processes (training, generation, export) and speaks JSON-line events.

Holds one sub-package per concern, layered from the top: ``cli`` (the command line; ``__main__`` dispatches to it),
``demo``, then ``train``, ``generate`` and ``export`` (siblings that never import each other), then ``decoding`` (the
decode loop generation and training share) beside ``reward_model`` (a reward model's saved form, loader and scorer),
then ``datasets``, and at the bottom what all of them share: ``models``, ``checkpoint`` and ``logs``. A layer
imports only the layers below it (import-linter: "The engine is layered"), so generation never imports training and
nothing imports the CLI.

May import: core, kernels, and the ML stack (torch, transformers, peft, bitsandbytes, datasets); never Qt or the
studio (import-linter: "The engine and kernels never import Qt or the studio"). Importing ``engine`` is cheap;
torch and transformers load only when a command needs them.
"""

"""What is built on decograph, through its public names only.

- ``decograph.apps.ner``: PaDeLLM-NER (``decograph ner``), parallel label-wise decoding;
- ``decograph.apps.train_mdm``: trains the small masked diffusion LM the unmask strategies run
  on (``decograph train-mdm``), with its second stage in ``decograph.apps.distill_mdm``
  and what both stages share in ``decograph.apps.mdm_training``;
- ``decograph.apps.loading``: what the tools (bench, viz, the CLI) give ``--model`` and
  ``--set``: the model a ``--model`` names, quietly loaded.

Nothing below this package (ir, frontends, passes, runtime, backends, models) imports it.
"""

"""Drafters for ``dspark_ext.generate``, one module per drafter (the ``Drafter`` protocol is in
dspark_ext/protocols.py):

* ``simple``: ``AutoregressiveDrafter`` (no drafts: plain decoding in the same loop) and
  ``MarkovDrafter`` (fixed or computed backbone logits + a Markov head, a toy DSpark);
* ``lookup``: ``NgramDrafter``, training-free prompt lookup;
* ``dspark``: ``DSparkDrafter``, the trained DSpark drafter (backbone + Markov + confidence heads);
* ``hybrid``: ``HybridDrafter``, prompt lookup and DSpark chosen per request by calibrated
  expected accepted length.
"""

from dspark_ext.drafters.simple import AutoregressiveDrafter, MarkovDrafter
from dspark_ext.drafters.lookup import NgramDrafter
from dspark_ext.drafters.dspark import DrafterConfig, DSparkDrafter
from dspark_ext.drafters.hybrid import HybridDrafter

__all__ = ["AutoregressiveDrafter", "MarkovDrafter", "NgramDrafter", "DSparkDrafter", "DrafterConfig", "HybridDrafter"]

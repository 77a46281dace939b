"""Synthetic data with known truth: real pyramidal slides (``slides``), cohort tables with planted effects
(``cohort``) and the demo built from both (``demo``)."""

from pathomics.synthetic.slides import CohortFiles, SlideTruth, read_cohort_truth, write_cohort, write_slide

__all__ = ["CohortFiles", "SlideTruth", "read_cohort_truth", "write_cohort", "write_slide"]

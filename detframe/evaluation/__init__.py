"""detframe's evaluators: COCO box / mask AP and class-agnostic proposal recall.

Both follow one protocol: `reset()`, `process(inputs, outputs)` per batch (inputs are the
dataset dicts with "image_id", outputs the per-image `Instances`), and `evaluate()`, which
returns {task: {metric: value in percent}} on rank 0 and {} on the other ranks. They are
registered in `EVALUATOR_REGISTRY` as "COCOEvaluator" and "ProposalEvaluator".
"""

from .coco_evaluation import COCOEvaluator, gather_to_main_process, load_coco
from .proposal_evaluation import ProposalEvaluator, greedy_matched_ious

__all__ = [
    "COCOEvaluator",
    "ProposalEvaluator",
    "gather_to_main_process",
    "greedy_matched_ious",
    "load_coco",
]

"""detframe's evaluators: COCO box / mask AP and class-agnostic proposal recall.

Both follow one protocol: `reset()`, `process(inputs, outputs)` per batch (inputs are the
dataset dicts with "image_id", outputs the per-image `Instances`), and `evaluate()`, which
returns {task: {metric: value in percent}} on rank 0 and {} on the other ranks. They are
registered in `EVALUATOR_REGISTRY` as "COCOEvaluator" and "ProposalEvaluator".
`inference_on_dataset` runs a model over a data loader and evaluates its detections.
"""

from .coco_evaluation import COCOEvaluator, load_coco
from .inference import inference_context, inference_on_dataset
from .proposal_evaluation import ProposalEvaluator, greedy_matched_ious

__all__ = [
    "COCOEvaluator",
    "ProposalEvaluator",
    "greedy_matched_ious",
    "inference_context",
    "inference_on_dataset",
    "load_coco",
]

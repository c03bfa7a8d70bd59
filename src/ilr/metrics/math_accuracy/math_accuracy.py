"""`math_accuracy`: final-answer accuracy of maths completions, as `ilr evaluate` scores them (math-verify's verdicts)."""

import datasets
import evaluate

from ilr.rewards import score_math


_DESCRIPTION = """
Accuracy of maths completions against gold final answers, scored by `ilr.rewards.score_math` with its `evaluation`
preset, as `ilr evaluate` does: the answer is what math-verify's default extraction finds in the completion (boxed or
not, as lighteval reads it), compared with math-verify (gold first). A prediction that cannot be scored (unparsable
gold, timeout) counts as wrong and is reported in `unscored`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): model completions.
    references (`list[str]`): gold final answers, one per completion.
Returns:
    accuracy (`float`): fraction of correct completions.
    unscored (`int`): completions that could not be scored (counted as wrong).
Examples:
    >>> metric = ilr.metrics.load_metric("math_accuracy")
    >>> metric.compute(predictions=["so \\\\boxed{4}"], references=["4"])
    {'accuracy': 1.0, 'unscored': 0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MathAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        scores = score_math(list(predictions), list(references), scoring="evaluation")
        correct = [score or 0.0 for score in scores]
        return {
            "accuracy": sum(correct) / len(correct) if correct else 0.0,
            "unscored": sum(score is None for score in scores),
        }

"""`pass_at_k`: the unbiased pass@k estimator over problems, from per-problem sample and correct counts."""

import datasets
import evaluate

from ilr.stats import pass_at_k


_DESCRIPTION = """
Unbiased pass@k (Chen et al., 2021), `1 - C(n - c, k) / C(n, k)` per problem, averaged over problems; computed by
`ilr.stats.pass_at_k`, which never forms a binomial coefficient. With `n = k = 1` it is plain accuracy.
"""

_KWARGS_DESCRIPTION = """
Args:
    num_correct (`list[int]`): correct samples per problem (`c`).
    num_samples (`list[int]`): samples drawn per problem (`n`).
    k (`list[int]`, defaults to `[1]`): the k values to report; each needs `k <= n` for every problem.
Returns:
    `pass@<k>` (`float`) for each k.
Examples:
    >>> metric = ilr.metrics.load_metric("pass_at_k")
    >>> metric.compute(num_correct=[2], num_samples=[5], k=[1])
    {'pass@1': 0.4}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PassAtK(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"num_correct": datasets.Value("int64"), "num_samples": datasets.Value("int64")}
            ),
        )

    def _compute(self, num_correct, num_samples, k=(1,)):
        ks = [k] if isinstance(k, int) else list(k)
        return {f"pass@{value}": float(pass_at_k(num_samples, num_correct, value).mean()) for value in ks}

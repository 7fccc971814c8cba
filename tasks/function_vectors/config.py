"""The `function_vectors` config section."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from lensflow.tasks.core.config import Section


class FunctionVectorsConf(Section):
    """Function vectors (Todd et al. 2024): mean head outputs, a head-patching pass, the vector and its tests."""

    icl_tasks: list[str] | None = Field(default=None, min_length=1)  # ICL task names; None = every built-in ICL task plus those in icl_task_paths
    icl_task_paths: list[str] = []  # extra ICL task files or folders of <name>.json ([{"input", "output"}, ...])
    seed: int = 0  # ICL task splits (train / valid / test) and prompt sampling
    n_shots: int = Field(default=10, gt=0)
    query_template: str = "Q: {input}\nA:"
    answer_template: str = " {output}"  # the first token of this continuation is the scored answer
    separator: str = "\n\n"
    natural_templates: list[str] = ['The word "{input}" means', "When I think of {input}, I think of", "{input}:"]
    n_clean: int = Field(default=5, gt=0)  # clean prompts per ICL task for the mean head outputs (paper: 100)
    n_shuffled: int = Field(default=3, gt=0)  # shuffled-label prompts per ICL task for head patching (paper: 25)
    n_test: int = Field(default=12, gt=0)  # test queries per ICL task, before keeping those solved at n_shots (paper: 50)
    # validation queries per ICL task for layer=auto, filtered like n_test: they only choose the layer, and 6 x 63 ICL
    # tasks choose the same one as 12 (half the scan's time)
    n_valid: int = Field(default=6, gt=0)
    demo_sets: int | None = Field(default=3, gt=0)  # demonstration sets shared by test queries; None = one per query
    filter_correct: bool = True  # evaluate only test queries the model answers right at n_shots (as the paper)
    top_k: int | None = Field(default=None, gt=0)  # heads in the vector; None = min(10, all heads // 4)
    layer: int | Literal["auto"] = "auto"  # resid layer the vector is added at (0 = embeddings); auto = best
    # zero-shot accuracy with the vector on the ICL tasks' validation queries (mean over ICL tasks), among the
    # layer scan's layers (every layer_scan_stride-th; every layer when the stride is 0)
    scale: float = 1.0  # multiplier on the vector when added
    layer_scan_stride: int = Field(default=3, ge=0)  # evaluate adding the vector at every k-th layer; 0 = off
    # directed pairs "<source>-><target>" of ICL tasks: the source's vector added to the target's zero-shot test
    # prompts, beside the target's own vector; a source or target not in icl_tasks is swept for its head means only.
    # Default: both directions of the only same-task pairs SmolLM2-135M solves at 10 shots in two languages
    # (capitalizing English, French and Spanish words; the candidates measured: tasks/data/icl/README.md)
    transfer: list[str] = ["capitalize->capitalize_french", "capitalize_french->capitalize",
                           "capitalize->capitalize_spanish", "capitalize_spanish->capitalize",
                           "capitalize_french->capitalize_spanish", "capitalize_spanish->capitalize_french"]
    pack_tokens: int = Field(default=1024, gt=0)  # most query tokens packed into one shared-prefix forward pass

    @field_validator("layer", mode="before")
    @classmethod
    def _layer(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError("expected a resid layer (an int >= 0) or 'auto'")

    @field_validator("query_template", "natural_templates")
    @classmethod
    def _has_input(cls, v: str | list[str]) -> str | list[str]:
        for t in [v] if isinstance(v, str) else v:
            if "{input}" not in t:
                raise ValueError(f"template must contain {{input}}: {t!r}")
        return v

    @field_validator("answer_template")
    @classmethod
    def _has_output(cls, v: str) -> str:
        if "{output}" not in v:
            raise ValueError("template must contain {output}")
        return v

    @field_validator("transfer")
    @classmethod
    def _directed_pairs(cls, v: list[str]) -> list[str]:
        pairs = []
        for s in v:
            ends = [e.strip() for e in s.split("->")]
            if len(ends) != 2 or not all(ends) or ends[0] == ends[1]:
                raise ValueError(f"expected '<source ICL task>-><target ICL task>' of two ICL tasks, got {s!r}")
            pairs.append("->".join(ends))
        return list(dict.fromkeys(pairs))

    def transfer_pairs(self) -> list[tuple[str, str]]:
        """(source, target) ICL task names of each directed transfer."""
        return [tuple(p.split("->")) for p in self.transfer]

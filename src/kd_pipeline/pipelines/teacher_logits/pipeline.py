from kedro.pipeline import Pipeline, node

from kd_pipeline.pipelines.teacher_logits.nodes import extract_teacher_topk_node, teacher_logits_report


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                extract_teacher_topk_node,
                ["teacher_model", "tokenized_corpus", "params:teacher_logits"],
                "teacher_topk",
                name="extract_teacher_topk",
            ),
            node(teacher_logits_report, "teacher_topk", "teacher_logits_report", name="teacher_logits_report"),
        ],
        namespace="teacher_logits",
        prefix_datasets_with_namespace=False,
    )

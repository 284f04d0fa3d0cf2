from kedro.pipeline import Pipeline, node

from kd_pipeline.pipelines.distill.nodes import build_vocab_map, summarize_training, train_student


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                # The (teacher, student tokenizer) vocabulary map; only a summary when the
                # student shares the teacher's tokenizer.
                func=build_vocab_map,
                inputs=["teacher_model", "params:distill.cross_tokenizer"],
                outputs="vocab_map",
                name="build_vocab_map",
            ),
            node(
                # Returns a writer: training runs when the catalog saves `student_model`, into
                # its folder (checkpoints beside it, so a killed run resumes).
                func=train_student,
                inputs=["tokenized_corpus", "teacher_topk", "teacher_model", "params:distill", "vocab_map"],
                outputs="student_model",
                name="train_student",
            ),
            node(
                func=summarize_training,
                inputs=["student_model", "params:distill.tracking"],
                outputs="distill_summary",
                name="summarize_training",
            ),
        ],
        namespace="distill",
        prefix_datasets_with_namespace=False,
    )

from kedro.pipeline import Pipeline, node

from kd_pipeline.pipelines.corpus_prep.nodes import prepare_teacher_model, tokenize_corpus


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(prepare_teacher_model, "params:corpus_prep.teacher", "teacher_model", name="prepare_teacher_model"),
            node(
                tokenize_corpus,
                ["teacher_model", "params:corpus_prep"],
                ["tokenized_corpus", "corpus_report"],
                name="tokenize_corpus",
            ),
        ],
        namespace="corpus_prep",
        prefix_datasets_with_namespace=False,
    )

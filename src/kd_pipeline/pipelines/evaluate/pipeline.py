from kedro.pipeline import Pipeline, node

from kd_pipeline.pipelines.evaluate.nodes import (
    evaluate_student,
    generate_samples,
    plot_training_curves,
    track_evaluation,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                func=evaluate_student,
                inputs=["student_model", "tokenized_corpus", "teacher_topk", "teacher_model", "params:evaluate.metrics",
                        "vocab_map", "params:distill.cross_tokenizer"],
                outputs="eval_metrics",
                name="evaluate_student",
            ),
            node(
                func=generate_samples,
                inputs=["student_model", "teacher_model", "params:evaluate.generation"],
                outputs="eval_generations",
                name="generate_samples",
            ),
            node(
                func=plot_training_curves,
                inputs=["distill_summary", "params:distill", "params:evaluate.plots"],
                outputs="eval_plots",
                name="plot_training_curves",
            ),
            node(
                # Takes the distill and extraction params so that kedro-mlflow logs them in this
                # run too: the MLflow table then shows loss weights, temperatures, KL direction
                # and k next to the eval metrics.
                func=track_evaluation,
                inputs=["eval_metrics", "teacher_topk", "params:distill", "params:teacher_logits", "vocab_map"],
                outputs="eval_mlflow_metrics",
                name="track_evaluation",
            ),
        ],
        namespace="evaluate",
        prefix_datasets_with_namespace=False,
    )

"""glmjax: pretrain GLM-family language models in JAX."""

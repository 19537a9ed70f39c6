"""``python -m glmjax.train --config=configs/tiny.py --workdir=DIR [--config.a.b=value ...]``"""
from glmjax.train.cli import main

if __name__ == "__main__":
    main()

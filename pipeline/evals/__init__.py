"""What a distilled student is worth next to its teacher: the evals of one experiment (``run``:
memory and latency, attention FLOPs, quality, content, the window chooser), choosing W before
training (``window_choice``), the results harness behind the docs' table (``ablation``, its
claims, cells and long-form section: ``claims``, ``cells``, ``long_form``) and the tables a job
prints (``report``)."""

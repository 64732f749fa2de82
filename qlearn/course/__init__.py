"""The course tooling, apart from the library: what runs the course rather than what it teaches.

    qlearn.course.cli          the `qlearn` command (doctor, lab, run, exercises)
    qlearn.course.doctor       is this machine ready? (bitsandbytes really quantizes, the model loads)
    qlearn.course.runner       execute notebooks headless, with a status and seconds per notebook
    qlearn.course.exercises    learner copies (solutions replaced by stubs) and checking them
    qlearn.course.conventions  what every notebook shares: the badges line, the setup cell, the repository
    qlearn.course.drift        the drift guard: the keywords the course passes, against the installed libraries

The exercise checkers stay at `qlearn.check.nbNN`, the name every notebook imports.
"""

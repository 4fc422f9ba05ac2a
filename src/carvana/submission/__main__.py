"""``python -m carvana.submission validate|score|upload``: see carvana.submission.validate."""

import sys

from carvana.submission.validate import main

sys.exit(main())

# Copyright (c) monai-icon contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0
"""``python -m monai_icon ...`` runs the ``monai-icon`` command line."""

import sys

from monai_icon.apps.cli import main

sys.exit(main())

# The README example's code, as `thyme sandbox run` takes it: crop the blue car's plate and zoom in.
# `image_path` is the input image; files saved under /mnt/data/temp_processed_images/ land in the session's scratch
# directory, and a saved image reaches the model (and the CLI's `image:` lines) only when its path is printed.
import os

import cv2

image = cv2.imread(image_path)
x1, y1, x2, y2 = 1250, 1030, 1360, 1070
crop = cv2.resize(image[y1:y2, x1:x2], None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
processed_path = os.path.join("/mnt/data/temp_processed_images/", "17127_plate.jpg")
cv2.imwrite(processed_path, crop)
print(processed_path)

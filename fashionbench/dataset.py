"""Fashion-MNIST's facts, in one place: file names and checksums, classes, image shape."""

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CLASSES = len(CLASS_NAMES)
IMAGE_SIDE = 28                          # px; images are 1 x 28 x 28, uint8
INPUT_SHAPE = (1, IMAGE_SIDE, IMAGE_SIDE)
INPUT_SIZES = (IMAGE_SIDE, 32)           # px a recipe may train at: 32 = resized (CIFAR-sized models)
RESIZE_MARGIN = 4                        # px: 32 is a random (training) or centre crop of 36
LIGHT_ON_DARK = True                     # garments bright on a black (0) background
PIXELS = IMAGE_SIDE * IMAGE_SIDE
TRAIN_IMAGES = 60_000
TEST_IMAGES = 10_000

# SHA-256 of each file's decompressed IDX content. Mirrors recompress the .gz files (the
# Debian package's bytes differ from the official ones); the content never changes.
FILES = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

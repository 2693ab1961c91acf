"""fashionbench: an honest, fast, reproducible Fashion-MNIST benchmark."""

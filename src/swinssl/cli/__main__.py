from swinssl.cli import main

main()

from crawler.early import main

main()

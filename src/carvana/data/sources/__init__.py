"""Where the data comes from: a folder, a Kaggle Notebook's mounted files, a Kaggle API
download, or (without any of them) the demo data.

  kaggle_credentials - where Kaggle credentials come from (their values are scrubbed by data.secrets)
  kaggle_client      - the official kaggle API: clear errors, submit
  archives           - which competition zips exist, whether one is whole, safe unpacking, the fetch lock
  notebook           - Kaggle Notebook: the mounted competition folder (CARVANA_INPUT), the working folder
  mounted            - the mounted competition files (zips and/or unpacked folders) as a dataset folder
  fetcher            - DatasetFetcher: folder / mount / Kaggle download / demo data; car-grouped split
"""

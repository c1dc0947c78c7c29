#[tokio::main]
async fn main() {
    let which = std::env::args().nth(1).unwrap_or_default();
    if which != "put" {
        let r = rhinobus_samples::scenarios::dht::dht_get(100_000, 50)
            .await
            .unwrap();
        println!("{}", r.human());
    }
    if which != "get" {
        let r = rhinobus_samples::scenarios::dht::dht_put(100_000, 50)
            .await
            .unwrap();
        println!("{}", r.human());
    }
}
